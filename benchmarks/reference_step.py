"""A distillation step in the style of the SKD-CAG paper's public code, for speed comparisons only.

The public code of "Sealing The Backdoor" (arXiv 2508.18235) trains at batch size 1 in
float32 and copies cross-attention maps to the host on every forward pass. This module
does the same work so that the benchmark can compare Sealer's step against it on the same
model and machine. It is written for the benchmark and is not a copy of that code:

- every attention module, self-attention included, runs an explicit softmax(QK^T / sqrt(d));
- a forward hook on every attention module takes the head-averaged cross-attention maps,
  detaches them, moves them to the CPU and resizes them there to the latent grid. It copies
  no self-attention maps, because their keys are image positions, not text tokens, and
  skipping them makes this step faster, not slower;
- one prompt is tokenized and encoded per step, clean for the teacher and with the trigger
  in front for the student;
- teacher and student forwards, MSE prediction loss, an attention loss computed from the
  detached CPU maps (so, as in the public code, it reaches no parameter), AdamW, an EMA.

Gradient checkpointing, which the public code turns on, is off unless `checkpointing=True`.
"""

import copy
import logging
import random

import torch
import torch.nn.functional as F

from benchmarks.common import (
    PROMPTS,
    TRIGGER,
    build_components,
    cuda_peak_mb,
    parameter_count,
    time_steps,
)
from core.components import Components

logger = logging.getLogger(__name__)


class ExplicitAttentionProcessor:
    """Attention with an explicit softmax that leaves its probabilities on the module for a hook.

    Used on every diffusers `Attention` module. The probabilities of cross-attention layers
    are stored as `attn.attention_probs` (B, heads, N_query, N_text) for the forward hook.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states

        batch, query_len, _ = hidden_states.shape
        key_len = context.shape[1]
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = query.shape[-1] // heads
        query = query.view(batch, query_len, heads, head_dim).transpose(1, 2)  # (B, nh, Nq, hd)
        key = key.view(batch, key_len, heads, head_dim).transpose(1, 2)  # (B, nh, Nk, hd)
        value = value.view(batch, key_len, heads, head_dim).transpose(1, 2)  # (B, nh, Nk, hd)

        probs = (torch.matmul(query, key.transpose(-1, -2)) * attn.scale).softmax(dim=-1)  # (B, nh, Nq, Nk)
        if is_cross:
            attn.attention_probs = probs

        hidden_states = torch.matmul(probs, value)  # (B, nh, Nq, hd)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, query_len, heads * head_dim)  # (B, Nq, C)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)  # (B, C, H, W)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class HostMapCollector:
    """Forward hooks that copy each cross-attention layer's maps to the CPU and resize them there."""

    def __init__(self, latent_hw: tuple[int, int]) -> None:
        self.latent_hw = latent_hw
        self.maps: list[torch.Tensor] = []

    def hook(self, module, inputs, output) -> None:
        probs = getattr(module, "attention_probs", None)
        if probs is None:
            return
        module.attention_probs = None
        height, width = self.latent_hw
        maps = probs.detach().mean(dim=1).cpu()  # (B, nh, Nq, Nt) -> (B, Nq, Nt)
        batch, query_len, text_len = maps.shape
        scale = round((height * width / query_len) ** 0.5)
        grid = maps.transpose(1, 2).reshape(batch, text_len, height // scale, width // scale)  # (B, Nt, h, w)
        self.maps.append(F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False))

    def take(self) -> torch.Tensor:
        """Return the layer-averaged maps (B, Nt, H, W) of the last forward pass and empty the list."""
        combined = torch.stack(self.maps).mean(dim=0)  # (L, B, Nt, H, W) -> (B, Nt, H, W)
        self.maps = []
        return combined


def install_reference_attention(unet: torch.nn.Module, collector: HostMapCollector) -> int:
    """Put the explicit processor and the host-copy hook on every attention module; return their count."""
    from diffusers.models.attention_processor import Attention

    count = 0
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(ExplicitAttentionProcessor())
            module.register_forward_hook(collector.hook)
            count += 1
    return count


class ReferenceStyleStep:
    """One batch-1, float32 teacher-student step with host-side attention maps (see the module docstring)."""

    def __init__(
        self,
        components: Components,
        *,
        device: str = "cpu",
        trigger: str = TRIGGER,
        prompts: tuple[str, ...] = PROMPTS,
        learning_rate: float = 1e-4,
        attention_weight: float = 0.5,
        ema_decay: float = 0.99,
        checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        self.components = components
        self.device = torch.device(device)
        self.trigger = trigger
        self.prompts = prompts
        self.attention_weight = attention_weight
        self.ema_decay = ema_decay
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.trigger_tokens = len(components.tokenizer(trigger, add_special_tokens=False).input_ids)

        components.text_encoder.to(self.device).requires_grad_(False).eval()
        self.student = components.unet.to(self.device).train().requires_grad_(True)
        if checkpointing:
            self.student.enable_gradient_checkpointing()
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        latent_hw = components.latent_shape[1:]
        self.student_maps = HostMapCollector(latent_hw)
        self.teacher_maps = HostMapCollector(latent_hw)
        install_reference_attention(self.student, self.student_maps)
        install_reference_attention(self.teacher, self.teacher_maps)

        self.parameters = [param for param in self.student.parameters() if param.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, betas=(0.9, 0.999), weight_decay=0.01)
        self.ema = [param.detach().clone() for param in self.parameters]

    def _encode_one(self, prompt: str) -> torch.Tensor:
        """Tokenize and encode a single prompt: (1, max_length, D)."""
        input_ids = self.components.tokenize([prompt], self.device)
        with torch.no_grad():
            return self.components.text_encoder(input_ids)[0]

    def step(self) -> float:
        """Run one step and return its loss as a Python float (a host sync, as the public code does)."""

        # Maps that gradient checkpointing recorded during the last backward are dropped.
        self.student_maps.maps = []

        # Prompt p, triggered prompt p', one at a time.
        prompt = self.rng.choice(self.prompts)
        teacher_states = self._encode_one(prompt)
        student_states = self._encode_one(f"{self.trigger} {prompt}")

        # Noise latents at the model's shape and a timestep over the schedule.
        latents = torch.randn((1, *self.components.latent_shape), generator=self.generator).to(self.device)
        timesteps = torch.randint(0, self.components.num_train_timesteps, (1,), generator=self.generator).to(self.device)

        # Teacher and student forwards; the hooks leave their maps on the CPU.
        with torch.no_grad():
            teacher_pred = self.teacher(latents, timesteps, encoder_hidden_states=teacher_states).sample
        teacher_maps = self.teacher_maps.take()
        student_pred = self.student(latents, timesteps, encoder_hidden_states=student_states).sample
        student_maps = self.student_maps.take()

        # Attention loss on the host from detached maps: trigger tokens to zero, the rest to the teacher.
        trigger_end = 1 + self.trigger_tokens
        context = self.components.max_length
        loss_attn = F.mse_loss(student_maps[:, 1:trigger_end], torch.zeros_like(student_maps[:, 1:trigger_end]))
        loss_attn = loss_attn + F.mse_loss(student_maps[:, trigger_end:], teacher_maps[:, 1 : context - self.trigger_tokens])
        weight = min(self.components.num_train_timesteps / (float(timesteps.item()) + 1.0), 10.0)

        # Prediction loss, total loss, AdamW and the EMA.
        loss_pred = F.mse_loss(student_pred, teacher_pred)
        loss = (1 - self.attention_weight) * loss_pred + self.attention_weight * weight * loss_attn.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for shadow, param in zip(self.ema, self.parameters):
                shadow.lerp_(param.detach(), 1.0 - self.ema_decay)
        return float(loss.item())


def measure_reference(
    model: str,
    *,
    steps: int = 3,
    warmup: int = 2,
    device: str = "cpu",
    checkpointing: bool = False,
    seed: int = 0,
) -> dict:
    """Time the reference-style step on a model shape at batch 1, float32."""
    components = build_components(model, seed=seed, device=device)
    runner = ReferenceStyleStep(components, device=device, checkpointing=checkpointing, seed=seed)
    timing = time_steps(runner.step, steps=steps, warmup=warmup, device=device)
    return {
        "step": "reference",
        "model": model,
        "batch": 1,
        "precision": "fp32",
        "steps": steps,
        **timing,
        "steps_per_s": 1.0 / timing["seconds_per_step"],
        "samples_per_s": 1.0 / timing["seconds_per_step"],
        "unet_parameters": parameter_count(components.unet),
        "peak_cuda_mb": cuda_peak_mb(device),
    }
