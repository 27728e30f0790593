"""Tiny random Stable-Diffusion-shaped models built from configs, for tests that need no trained weights.

`tiny_components` gives engine tests the models in memory. The `make_*` functions save
them in every upload format Sealer reads. The original single-file layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`) is
written here by a key mapping of its own, so that tests of the loader's diffusers-based
conversion compare against an independent mapping.
"""

import json
import tarfile
import zipfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from core.components import Components
from core.tokenizer import load_clip_tokenizer

TEXT_HIDDEN = 32
LAYERS_PER_BLOCK = 1

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def tiny_components(*, latent: bool = False, seed: int = 0) -> Components:
    """Return random-weight components: pixel space 16x16 RGB, or 4x8x8 latents with a tiny VAE."""
    # One seed for all three models, so each draws its weights after the one before.
    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    text_encoder = make_tiny_text_encoder(len(tokenizer), seed=None, num_layers=1, num_heads=2)
    unet = make_tiny_unet(latent=latent, seed=None, attention_at_full_resolution=False)
    vae = make_tiny_vae(seed=None, block_out_channels=(8, 8), norm_num_groups=4) if latent else None
    return Components(tokenizer, text_encoder.eval(), unet, dict(SCHEDULER_CONFIG), vae)


def make_tiny_unet(
    *,
    latent: bool = False,
    seed: int | None = 0,
    cross_attention_dim: int = TEXT_HIDDEN,
    attention_at_full_resolution: bool = True,
) -> UNet2DConditionModel:
    """Return a random UNet: pixel space 3x16x16, or 4x8x8 latents when `latent`.

    Its cross-attention sits in the full-resolution block, or in the half-resolution one when
    `attention_at_full_resolution` is False. A `seed` of None keeps torch's current random state.
    """
    _seed(seed)
    channels, size = (4, 8) if latent else (3, 16)
    if attention_at_full_resolution:
        down_block_types, up_block_types = ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")
    else:
        down_block_types, up_block_types = ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=LAYERS_PER_BLOCK,
        block_out_channels=(16, 32),
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def make_tiny_text_encoder(
    vocab_size: int, *, seed: int | None = 0, num_layers: int = 2, num_heads: int = 4
) -> CLIPTextModel:
    _seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def make_tiny_vae(
    *, seed: int | None = 0, block_out_channels: tuple[int, int] = (8, 16), norm_num_groups: int = 8
) -> AutoencoderKL:
    """Return a random VAE that maps 3x16x16 images to 4x8x8 latents."""
    _seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        sample_size=16,
    )


def _seed(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def make_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )


def make_tiny_pipeline_dir(
    path: Path,
    *,
    latent: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """Save a tiny diffusers pipeline folder (tokenizer, text encoder, UNet, scheduler, VAE if latent)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = load_clip_tokenizer()
    tokenizer.save_pretrained(path / "tokenizer")
    models = {
        "text_encoder": make_tiny_text_encoder(len(tokenizer), seed=seed),
        "unet": make_tiny_unet(latent=latent, seed=seed + 1),
    }
    if latent:
        models["vae"] = make_tiny_vae(seed=seed + 2)
    for name, model in models.items():
        for parameter in model.parameters():
            parameter.data = parameter.data.to(dtype)
        model.save_pretrained(path / name)
    make_scheduler().save_pretrained(path / "scheduler")

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"] if latent else [None, None],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return path


def read_folder_state(path: Path, component: str) -> dict[str, torch.Tensor]:
    """Read the single safetensors weight file of one component folder."""
    (weights,) = sorted((Path(path) / component).glob("*.safetensors"))
    return load_file(weights)


# --- the original single-file layout ------------------------------------------------------


def _resnet_to_original(name: str) -> str:
    for diffusers_name, original_name in (
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    ):
        if name.startswith(diffusers_name + "."):
            return original_name + name[len(diffusers_name) :]
    raise KeyError(name)


def unet_key_to_original(key: str, layers_per_block: int = LAYERS_PER_BLOCK) -> str:
    """Map one diffusers UNet key to its `model.diffusion_model.*` key (SD 1.x block numbering)."""
    top_level = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    module, _, leaf = key.rpartition(".")
    if module in top_level:
        return f"model.diffusion_model.{top_level[module]}.{leaf}"

    parts = key.split(".")
    per_block = layers_per_block + 1
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            # down_blocks.B.downsamplers.0.conv.* -> input_blocks.N.0.op.*
            return f"model.diffusion_model.input_blocks.{(block + 1) * per_block}.0.op.{'.'.join(parts[5:])}"
        layer = int(parts[3])
        index = block * per_block + layer + 1
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"model.diffusion_model.input_blocks.{index}.0.{_resnet_to_original(rest)}"
        return f"model.diffusion_model.input_blocks.{index}.1.{rest}"

    if parts[0] == "mid_block":
        kind, layer, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"model.diffusion_model.middle_block.{2 * layer}.{_resnet_to_original(rest)}"
        return f"model.diffusion_model.middle_block.1.{rest}"

    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            # The upsampler follows the block's last layer, after its attention when it has one.
            index = block * per_block + layers_per_block
            return f"model.diffusion_model.output_blocks.{index}.{{upsampler}}.conv.{'.'.join(parts[5:])}"
        layer = int(parts[3])
        index = block * per_block + layer
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"model.diffusion_model.output_blocks.{index}.0.{_resnet_to_original(rest)}"
        return f"model.diffusion_model.output_blocks.{index}.1.{rest}"
    raise KeyError(key)


def unet_state_to_original(
    state: dict[str, torch.Tensor], layers_per_block: int = LAYERS_PER_BLOCK
) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to the original single-file keys."""
    has_attention = {key.split(".")[1] for key in state if key.startswith("up_blocks.") and ".attentions." in key}
    original = {}
    for key, tensor in state.items():
        name = unet_key_to_original(key, layers_per_block)
        if "{upsampler}" in name:
            block = key.split(".")[1]
            name = name.replace("{upsampler}", "2" if block in has_attention else "1")
        original[name] = tensor
    return original


def vae_key_to_original(key: str, num_blocks: int) -> str:
    """Map one diffusers AutoencoderKL key to its `first_stage_model.*` key."""
    renames = {"conv_norm_out": "norm_out", "conv_shortcut": "nin_shortcut"}
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return f"first_stage_model.{key}"
    coder, rest = parts[0], parts[1:]

    if rest[0] == "down_blocks":
        block = rest[1]
        if rest[2] == "downsamplers":
            rest = ["down", block, "downsample", *rest[4:]]
        else:
            rest = ["down", block, "block", *rest[3:]]
    elif rest[0] == "up_blocks":
        block = str(num_blocks - 1 - int(rest[1]))
        if rest[2] == "upsamplers":
            rest = ["up", block, "upsample", *rest[4:]]
        else:
            rest = ["up", block, "block", *rest[3:]]
    elif rest[0] == "mid_block":
        if rest[1] == "resnets":
            rest = ["mid", f"block_{int(rest[2]) + 1}", *rest[3:]]
        else:
            attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
            name = attention[rest[3]]
            tail = rest[5:] if rest[3] == "to_out" else rest[4:]
            rest = ["mid", "attn_1", name, *tail]
    rest = [renames.get(part, part) for part in rest]
    return "first_stage_model." + ".".join([coder, *rest])


def vae_state_to_original(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers VAE state dict to original keys; attention projections become 1x1 convolutions."""
    original = {}
    for key, tensor in state.items():
        name = vae_key_to_original(key, num_blocks)
        if ".attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # (C_out, C_in) -> (C_out, C_in, 1, 1)
        original[name] = tensor
    return original


def text_state_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a CLIPTextModel state dict to the OpenCLIP keys of Stable Diffusion 2.x single files.

    OpenCLIP packs q, k and v into one `in_proj` tensor. Stable Diffusion 2.x conditions on
    the penultimate layer, so its files have one layer more than the diffusers text encoder.
    That extra layer is added here as the last layer plus one.
    """
    prefix = "cond_stage_model.model."
    layer_names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    hidden = state["embeddings.token_embedding.weight"].shape[1]
    open_clip = {
        f"{prefix}token_embedding.weight": state["embeddings.token_embedding.weight"],
        f"{prefix}positional_embedding": state["embeddings.position_embedding.weight"],
        f"{prefix}ln_final.weight": state["final_layer_norm.weight"],
        f"{prefix}ln_final.bias": state["final_layer_norm.bias"],
        f"{prefix}text_projection": torch.eye(hidden),
    }
    num_layers = 1 + max(int(key.split(".")[2]) for key in state if key.startswith("encoder.layers."))
    for layer in range(num_layers + 1):
        source = f"encoder.layers.{min(layer, num_layers - 1)}."
        offset = 1 if layer == num_layers else 0
        target = f"{prefix}transformer.resblocks.{layer}."
        for diffusers_name, open_clip_name in layer_names.items():
            for leaf in ("weight", "bias"):
                open_clip[f"{target}{open_clip_name}.{leaf}"] = state[f"{source}{diffusers_name}.{leaf}"] + offset
        for leaf in ("weight", "bias"):
            projections = [state[f"{source}self_attn.{name}_proj.{leaf}"] for name in ("q", "k", "v")]
            open_clip[f"{target}attn.in_proj_{leaf}"] = torch.cat(projections) + offset  # (3 * hidden, ...) q, k, v
    return open_clip


def make_single_file(
    pipeline_dir: Path, path: Path, *, with_ema: bool = False, extra_keys: bool = True, open_clip: bool = False
) -> Path:
    """Write a pipeline folder's UNet, VAE and text encoder as one original-layout safetensors file.

    The text encoder takes the Stable Diffusion 1.x layout, or the 2.x OpenCLIP layout when `open_clip`.
    """
    pipeline_dir = Path(pipeline_dir)
    unet_config = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    tensors = unet_state_to_original(read_folder_state(pipeline_dir, "unet"), unet_config["layers_per_block"])
    if (pipeline_dir / "vae").is_dir():
        vae_config = json.loads((pipeline_dir / "vae" / "config.json").read_text())
        tensors |= vae_state_to_original(read_folder_state(pipeline_dir, "vae"), len(vae_config["down_block_types"]))
    text_state = read_folder_state(pipeline_dir, "text_encoder")
    if open_clip:
        tensors |= text_state_to_open_clip(text_state)
    else:
        tensors |= {f"cond_stage_model.transformer.text_model.{key}": value for key, value in text_state.items()}

    if with_ema:
        for key, value in list(tensors.items()):
            if key.startswith("model.diffusion_model."):
                # The original EMA keys drop the dots after `model_ema.`.
                tensors["model_ema." + key[len("model.") :].replace(".", "")] = value + 1
    if extra_keys:
        tensors["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000, dtype=torch.float32)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata={"format": "pt"})
    return Path(path)


def make_unet_file(pipeline_dir: Path, path: Path) -> Path:
    """Write a pipeline folder's UNet as a diffusers-key safetensors file."""
    save_file(read_folder_state(pipeline_dir, "unet"), str(path), metadata={"format": "pt"})
    return Path(path)


# --- archives --------------------------------------------------------------------------


def zip_folder(folder: Path, path: Path, *, top_level: str | None = None) -> Path:
    """Zip a folder; members sit under `top_level/` when given, else at the archive root."""
    folder = Path(folder)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                name = file.relative_to(folder).as_posix()
                archive.write(file, f"{top_level}/{name}" if top_level else name)
    return Path(path)


def tar_folder(folder: Path, path: Path, *, top_level: str | None = None, mode: str = "w:gz") -> Path:
    folder = Path(folder)
    with tarfile.open(path, mode) as archive:
        archive.add(folder, arcname=top_level or ".")
    return Path(path)
