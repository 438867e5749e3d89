"""Plain PyTorch reference for rope_cache_write, and the rotation itself as transformers computes it."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated by cos/sin [N, D] (cast to x's dtype first, as transformers does)."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin


def rope_cache_write_naive(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slots: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Same arguments as rope_cache_write; returns q [N, HQ, D] and writes the cache in place."""
    N = qkv.shape[0]
    D = k_cache.shape[-1]
    q, k, v = qkv.split((n_heads * D, n_kv_heads * D, n_kv_heads * D), dim=-1)
    q = apply_rope(q.reshape(N, n_heads, D), cos, sin)
    k = apply_rope(k.reshape(N, n_kv_heads, D), cos, sin)
    keep = slots >= 0
    kf, vf = k_cache.view(-1, n_kv_heads, D), v_cache.view(-1, n_kv_heads, D)
    kf.index_copy_(0, slots[keep], k[keep].to(kf.dtype))
    vf.index_copy_(0, slots[keep], v.reshape(N, n_kv_heads, D)[keep].to(vf.dtype))
    return q
