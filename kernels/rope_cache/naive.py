"""Plain PyTorch reference for rope_cache_write."""

from __future__ import annotations

import torch


def rope_naive(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated by cos/sin [N, D] in the rotate-half layout, cos and sin cast to x's dtype first and
    each product and sum rounded to it, as transformers' x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    c, s = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]     # [N, 1, D]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]), dim=-1)


def rope_cache_write_naive(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slots: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Same arguments as rope_cache_write; returns q [N, HQ, D] and writes the cache in place."""
    N = qkv.shape[0]
    D = k_cache.shape[-1]
    q, k, v = qkv.split((n_heads * D, n_kv_heads * D, n_kv_heads * D), dim=-1)
    q = rope_naive(q.reshape(N, n_heads, D), cos, sin)
    k = rope_naive(k.reshape(N, n_kv_heads, D), cos, sin)
    keep = slots >= 0
    kf, vf = k_cache.view(-1, n_kv_heads, D), v_cache.view(-1, n_kv_heads, D)
    kf.index_copy_(0, slots[keep], k[keep].to(kf.dtype))
    vf.index_copy_(0, slots[keep], v.reshape(N, n_kv_heads, D)[keep].to(vf.dtype))
    return q
