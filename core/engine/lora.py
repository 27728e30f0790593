"""LoRA adapters on the student UNet's attention projections, and their merge into plain weights.

With `training.lora_rank > 0` the student keeps its uploaded weights frozen and trains a
low-rank update W + (alpha / r) * B A on every attention projection (`to_q`, `to_k`,
`to_v`, `to_out.0`, in self- and cross-attention). AdamW moments, gradients and the EMA
shadow then exist only for the adapters, which is what makes large UNets fit on smaller
GPUs. The output is the merged UNet, with the same keys and shapes as the input.
"""

import logging

import torch

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_PARAMETER_MARKER = ".lora_"


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, seed: int) -> dict[str, torch.nn.Parameter]:
    """Freeze `unet`, add LoRA adapters to its attention projections and return the adapter parameters.

    B starts at zero, so the wrapped UNet computes exactly what the frozen one does. A is
    drawn from the CPU generator seeded with `seed`, so a run is reproducible and leaves the
    global random state as it was.
    """
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise RuntimeError(
            f"training.lora_rank {rank} needs the peft package, which failed to import ({error}). "
            "Install Sealer's engine extra (pip install 'sealer[engine]') or set training.lora_rank to 0"
        ) from None

    # NOTE: only the CPU path has run. bfloat16 autocast with adapters on CUDA is untested.
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGET_MODULES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)

    adapters = {name: param for name, param in unet.named_parameters() if param.requires_grad}
    non_adapter = [name for name in adapters if LORA_PARAMETER_MARKER not in name]
    if non_adapter or not adapters:
        raise RuntimeError(
            f"adding LoRA adapters left {len(adapters)} trainable parameters, {len(non_adapter)} of them "
            f"outside the adapters (e.g. {non_adapter[:1]}); the installed peft or diffusers version does not "
            "wrap the attention projections as expected"
        )
    _warn_full_rank(unet, rank)
    total = sum(param.numel() for param in unet.parameters())
    trained = sum(param.numel() for param in adapters.values())
    logger.info("LoRA rank %d, alpha %g: training %d of %d UNet parameters (%.2f%%)", rank, alpha, trained, total, 100.0 * trained / total)
    return adapters


def _warn_full_rank(unet: torch.nn.Module, rank: int) -> None:
    """Log when the rank reaches a projection's width, where the adapter saves nothing."""
    from peft.tuners.lora import LoraLayer

    widths = [min(module.in_features, module.out_features) for module in unet.modules() if isinstance(module, LoraLayer)]
    if widths and rank >= min(widths):
        logger.warning(
            "LoRA rank %d is at least the width %d of the narrowest attention projection; those adapters are full "
            "rank, and a smaller rank saves more memory",
            rank,
            min(widths),
        )


def merge_lora(unet: torch.nn.Module) -> None:
    """Add each adapter's (alpha / r) * B A to its base weight and put the plain layers back, in place.

    Raises ValueError when a merged weight is not finite.
    """
    unet.fuse_lora(safe_fusing=True)
    unet.unload_lora()


@torch.no_grad()
def merged_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the weights that `merge_lora` would produce, on the CPU, without copying the UNet.

    Keys are those of the UNet without adapters: `to_q.base_layer.weight` becomes
    `to_q.weight`, and adapter tensors are left out. The adapters and base weights of `unet`
    stay as they are. Each delta is computed on the UNet's device, one layer at a time, so
    a large UNet needs no second copy in accelerator memory.
    """
    from peft.tuners.lora import LoraLayer

    lora_layers = {f"{name}.base_layer.weight": module for name, module in unet.named_modules() if isinstance(module, LoraLayer)}
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in unet.state_dict().items():
        if LORA_PARAMETER_MARKER in key:
            continue
        value = tensor.detach()
        module = lora_layers.get(key)
        if module is not None:
            value = value.clone()
            for adapter in module.active_adapters:
                value += module.get_delta_weight(adapter).to(value.dtype)
            if not torch.isfinite(value).all():
                raise ValueError(f"merging the LoRA adapters into {key} gave non-finite weights because the adapters diverged; lower training.learning_rate")
        weights[key.replace(".base_layer.", ".")] = value.cpu().clone()
    return weights

