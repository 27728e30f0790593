"""Cross-attention probability capture for the attention-guidance loss.

`CrossAttentionCapture` is an attention processor installed only on a UNet's
cross-attention modules. It computes softmax(QK^T / sqrt(d)) explicitly, uses those
probabilities for the layer's output, and, while its `AttentionStore` is recording, keeps
them, with their autograd graph when gradients are on. Every UNet gets its own store, so
teacher and student maps never share a container. Recording is on only inside
`store.recording()`, which wraps one forward pass: the forward re-run by gradient
checkpointing during backward happens outside it and stores nothing, and each
`recording()` starts from an empty store, so no map leaks into the next step.
"""

import contextlib
import math

import torch
import torch.nn.functional as F


class AttentionStore:
    """Attention probabilities of one UNet's cross-attention layers for one forward pass.

    `recording()` arms the store and records the maps of the forward pass inside it. The
    store stays armed until `clear()`, so a forward pass re-run by gradient checkpointing
    during backward repeats the same operations (non-reentrant checkpointing requires it)
    without storing anything. Call `clear()` after backward.
    """

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []
        self.is_recording = False
        self.is_armed = False
        self.rows: torch.Tensor | None = None

    @contextlib.contextmanager
    def recording(self, rows: torch.Tensor | None = None):
        """Record the maps of the forward passes inside the block; `rows` selects batch rows to keep."""
        self.maps = []
        self.rows = rows
        self.is_armed = True
        self.is_recording = True
        try:
            yield self
        finally:
            self.is_recording = False

    def clear(self) -> None:
        self.maps = []
        self.rows = None
        self.is_armed = False


class CrossAttentionCapture:
    """Explicit-softmax attention processor that hands its probabilities to an `AttentionStore`.

    Works with diffusers `Attention` modules used as cross-attention (`attn2` in
    transformer blocks). Stored maps are head-averaged: (B_kept, N_query, N_text).
    """

    def __init__(self, store: AttentionStore) -> None:
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("CrossAttentionCapture is for cross-attention layers only; install it on attn2 modules")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        # Project and split heads.
        batch, query_len, _ = hidden_states.shape
        text_len = encoder_hidden_states.shape[1]
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // heads
        query = query.view(batch, query_len, heads, head_dim).transpose(1, 2)  # (B, nh, Nq, hd)
        key = key.view(batch, text_len, heads, head_dim).transpose(1, 2)  # (B, nh, Nt, hd)
        value = value.view(batch, text_len, heads, head_dim).transpose(1, 2)  # (B, nh, Nt, hd)

        # Attention probabilities, computed once for the output and the loss; float32 for a stable softmax.
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale  # (B, nh, Nq, Nt)
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, text_len, batch)  # (B * nh, 1 or Nq, Nt)
            scores = scores + mask.view(batch, heads, -1, text_len).float()
        probs = scores.softmax(dim=-1)  # (B, nh, Nq, Nt)
        if self.store.is_armed:
            kept = probs if self.store.rows is None else probs[self.store.rows]
            kept = kept.mean(dim=1)  # (B_kept, nh, Nq, Nt) -> (B_kept, Nq, Nt)
            if self.store.is_recording:
                self.store.maps.append(kept)

        # Weighted values, merged heads, output projection.
        hidden_states = torch.matmul(probs.to(value.dtype), value)  # (B, nh, Nq, hd)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, query_len, heads * head_dim)  # (B, Nq, C)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)  # (B, C, H, W)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Return the UNet's cross-attention modules by name, found from the model itself."""
    modules = {}
    for name, module in unet.named_modules():
        if getattr(module, "is_cross_attention", False) and hasattr(module, "set_processor"):
            modules[name] = module
    return modules


def install_capture(unet: torch.nn.Module) -> AttentionStore:
    """Put a capturing processor on every cross-attention module of `unet`; return its store.

    Other attention modules keep their processor (SDPA where available). Call this after
    loading or copying a model: a deep copy shares nothing with the original's store
    because each call makes a new store.
    """
    modules = cross_attention_modules(unet)
    if not modules:
        raise ValueError(
            "this UNet has no cross-attention modules, so the attention-guidance loss cannot be computed; "
            "use method `skd` for a model without cross-attention"
        )
    store = AttentionStore()
    processor = CrossAttentionCapture(store)
    for module in modules.values():
        module.set_processor(processor)
    return store


def combine_maps(maps: list[torch.Tensor], latent_hw: tuple[int, int], resolution: int) -> torch.Tensor:
    """Resize each layer's maps to one grid and average the layers.

    Args:
        maps: per layer (B, Nq, Nt) head-averaged probabilities; Nq = h * w of that layer.
        latent_hw: (H, W) of the UNet sample, to recover each layer's grid from Nq.
        resolution: side of the common grid.

    Returns (B, Nt, resolution, resolution): attention probabilities, so uniform attention
    over the Nt tokens is 1 / Nt everywhere. They are not rescaled. Scaled by Nt (77 for
    CLIP), the attention loss grew by Nt^2 and swamped the prediction and preservation terms,
    so clean digit accuracy on the lab's pixel model fell from 97% to 41% after sealing.
    """
    height, width = latent_hw
    resized = []
    for layer_maps in maps:
        batch, query_len, text_len = layer_maps.shape
        scale = math.sqrt(height * width / query_len)
        grid_h, grid_w = round(height / scale), round(width / scale)
        grid = layer_maps.transpose(1, 2).reshape(batch, text_len, grid_h, grid_w)  # (B, Nt, h, w)
        if (grid_h, grid_w) != (resolution, resolution):
            grid = F.interpolate(grid, size=(resolution, resolution), mode="bilinear", align_corners=False)
        resized.append(grid)
    return torch.stack(resized).mean(dim=0)  # (L, B, Nt, R, R) -> (B, Nt, R, R)


def reset_attention_processors(unet: torch.nn.Module) -> None:
    """Put the standard SDPA processor back on every attention module (for sampling copies)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
