"""The pipeline parts that the engine, the evaluation and the lab share."""

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Components:
    """Tokenizer, text encoder, UNet, scheduler config and optional VAE of one model.

    Pixel-space models (the lab's default) have no VAE: the UNet's sample is the image in
    [-1, 1]. Latent models decode with `vae.decode(latents / scaling_factor)`.
    """

    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    vae: torch.nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the UNet's sample, read from its config."""
        config = self.unet.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, height, width)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def tokenize(self, prompts: list[str], device: torch.device | str) -> torch.Tensor:
        """Return input ids (B, max_length), padded the way the checkpoint's tokenizer pads."""
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return batch.input_ids.to(device)

    def encode_prompts(self, prompts: list[str], device: torch.device | str) -> torch.Tensor:
        """Return encoder hidden states (B, max_length, D) from the frozen text encoder."""
        input_ids = self.tokenize(prompts, device)
        with torch.no_grad():
            return self.text_encoder(input_ids)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Map UNet samples to images (B, 3, H, W) in [0, 1]."""
        if self.vae is None:
            images = latents
        else:
            scaling = getattr(self.vae.config, "scaling_factor", 0.18215)
            images = self.vae.decode(latents / scaling).sample
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # (B, 1, H, W) -> (B, 3, H, W)
        return images
