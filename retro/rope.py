"""Rotary position embeddings as transformers computes them (same frequencies per scaling type, same
rotate-half layout), for arbitrary absolute positions, and the re-rotation of cached keys to new positions
(chunk-KV reuse: a chunk's keys computed at one offset, placed at another)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                    max_position_embeddings: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] float32 and the attention scaling that multiplies cos and sin (YaRN's
    mscale; 1 otherwise)."""
    scaling = scaling or RopeScaling()
    dim = head_dim
    base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = scaling.type
    if kind == "default":
        return base, 1.0
    if kind == "linear":
        return base / scaling.factor, 1.0
    if kind == "llama3":
        old = scaling.original_max_position_embeddings or max_position_embeddings
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / base
        # long wavelengths divided by factor, short kept, a smooth interpolation between
        inv = torch.where(wavelen > low_wavelen, base / scaling.factor, base)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * inv / scaling.factor + smooth * inv
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, inv), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling, max_position_embeddings)
    raise ValueError(f"rope scaling type {kind!r} not supported")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, s: RopeScaling, max_pos: int | None) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate the low frequencies, extrapolate the high ones, a linear ramp
    between; cos/sin scaled by the attention factor."""
    factor = s.factor
    omax = s.original_max_position_embeddings or max_pos
    if s.attention_factor is not None:
        att = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        att = _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
    else:
        att = _yarn_mscale(factor)

    def correction_dim(n_rot):
        return (dim * math.log(omax / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(att)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_scaling: float = 1.0):
    """cos, sin [N, head_dim] float32 for positions [N] (rotate-half layout: the angles twice)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)                 # [N, D]
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated by cos/sin [N, D] (cast to x's dtype first, as transformers does)."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin


def rerotate_keys(k: torch.Tensor, old_positions: torch.Tensor, new_positions: torch.Tensor,
                  inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys k [N, H, D] rotated at old_positions [N], moved to new_positions [N]: one more rotation by the
    difference (rotations compose; YaRN's attention scaling is already in k, so this one is unscaled)."""
    delta = (new_positions.to(torch.int64) - old_positions.to(torch.int64)).to(k.device)
    cos, sin = rope_cos_sin(inv_freq.to(k.device), delta)
    if k.dtype != torch.float32:
        # rotate in float32 and round once
        return apply_rope(k.float(), cos, sin).to(k.dtype)
    return apply_rope(k, cos, sin)


class Rotary(nn.Module):
    """The model's RoPE: inverse frequencies as a buffer (follows .to(device)), cos/sin for given positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv, self.attention_scaling = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling,
                                                      config.max_position_embeddings)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions: torch.Tensor):
        """positions [N] -> cos, sin [N, head_dim] float32."""
        return rope_cos_sin(self.inv_freq, positions, self.attention_scaling)
