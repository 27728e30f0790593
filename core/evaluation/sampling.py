"""Batched, seeded image sampling the way users sample: DDIM with classifier-free guidance."""

import logging

import numpy as np
import torch
from diffusers import DDIMScheduler

from core.components import Components

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE_SCALE = 7.5


def make_sampling_scheduler(scheduler_config: dict) -> DDIMScheduler:
    """Build the DDIM sampler from the checkpoint's own scheduler config.

    Keys that DDIM does not know are dropped by `from_config`. `clip_sample` is taken from
    the checkpoint: real Stable Diffusion ships `False`, and clipping x0 while the unclipped
    noise prediction drives the update ruins guided samples, so `step()` is called with
    `use_clipped_model_output=True` whenever clipping is on.
    """
    return DDIMScheduler.from_config(scheduler_config)


def initial_noise(shape: tuple[int, int, int], seeds: list[int]) -> torch.Tensor:
    """Return (N, C, H, W) float32 noise, one CPU generator per seed, so batching never changes an image."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.stack(noise)


@torch.no_grad()
def sample_images(
    components: Components,
    prompts: list[str],
    seeds: list[int],
    *,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    num_inference_steps: int = 25,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    unet: torch.nn.Module | None = None,
) -> np.ndarray:
    """Sample one image per (prompt, seed) pair.

    Returns float32 images (N, H, W, 3) in [0, 1]. `unet` overrides the components' UNet
    (the evaluation samples the same pipeline before and after unlearning). A guidance
    scale of 1 or less samples the conditional prediction alone.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; pass one seed per prompt")
    unet = unet if unet is not None else components.unet
    unet_dtype = next(unet.parameters()).dtype
    scheduler = make_sampling_scheduler(components.scheduler_config)
    use_clipped = bool(scheduler.config.get("clip_sample", False))
    guided = guidance_scale > 1.0

    empty_states = components.encode_prompts([""], device)
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        batch_seeds = seeds[start : start + batch_size]

        # Encode the conditional and, under guidance, the unconditional prompt.
        cond_states = components.encode_prompts(batch_prompts, device)
        if guided:
            uncond_states = empty_states.expand(len(batch_prompts), -1, -1)
            encoder_states = torch.cat([uncond_states, cond_states])  # (2B, L, D)
        else:
            encoder_states = cond_states
        encoder_states = encoder_states.to(unet_dtype)

        # Start from seeded noise and run the DDIM loop.
        latents = initial_noise(components.latent_shape, batch_seeds).to(device)
        latents = latents * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_inference_steps, device=device)
        for timestep in scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            noise_pred = unet(model_input.to(unet_dtype), timestep, encoder_hidden_states=encoder_states).sample
            noise_pred = noise_pred.float()
            if guided:
                noise_uncond, noise_cond = noise_pred.chunk(2)  # (2B, C, H, W) -> 2 x (B, C, H, W)
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = scheduler.step(noise_pred, timestep, latents, use_clipped_model_output=use_clipped).prev_sample

        images = components.decode(latents.to(components.vae.dtype) if components.vae is not None else latents)
        outputs.append(images.permute(0, 2, 3, 1).cpu().numpy())  # (B, 3, H, W) -> (B, H, W, 3)

    return np.concatenate(outputs).astype(np.float32)
