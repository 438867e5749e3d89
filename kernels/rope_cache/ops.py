"""rope_cache_write as one Triton kernel: program (token, head) rotates a query head into q, or rotates a key
head and copies the matching value head into their cache slot. Replaces a split, two rotations of about
five kernels each and two index copies; the roundings are torch's, step by step, so bf16 results match."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import check_head_dim


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2):
    """The two halves of x * cos + rotate_half(x) * sin, each product and the sum rounded to x's dtype."""
    dt = x1.dtype
    a1 = (x1.to(tl.float32) * c1).to(dt).to(tl.float32)
    b1 = (-(x2.to(tl.float32)) * s1).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c2).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * s2).to(dt).to(tl.float32)
    return (a1 + b1).to(dt), (a2 + b2).to(dt)


@triton.jit
def rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr,
                      stride_t, stride_cs, stride_qt, stride_qh, stride_cslot, stride_ch,
                      HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)                       # 0 .. HQ-1: a query head; HQ .. HQ+HKV-1: a key/value head
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, HALF)
    dt = qkv_ptr.dtype.element_ty
    # cos/sin rounded to the activations' dtype first, as transformers casts them
    c1 = tl.load(cos_ptr + t * stride_cs + d).to(dt).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_cs + HALF + d).to(dt).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_cs + d).to(dt).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_cs + HALF + d).to(dt).to(tl.float32)
    src = qkv_ptr + t * stride_t + h * D       # q heads, then k heads: one run of columns
    x1 = tl.load(src + d)
    x2 = tl.load(src + HALF + d)
    o1, o2 = _rotate(x1, x2, c1, c2, s1, s2)
    if h < HQ:
        dst = q_ptr + t * stride_qt + h * stride_qh
        tl.store(dst + d, o1)
        tl.store(dst + HALF + d, o2)
    else:
        slot = tl.load(slot_ptr + t)
        if slot >= 0:                           # a negative slot: a padding token, nothing cached
            kh = h - HQ
            dst = k_ptr + slot * stride_cslot + kh * stride_ch
            tl.store(dst + d, o1.to(k_ptr.dtype.element_ty))
            tl.store(dst + HALF + d, o2.to(k_ptr.dtype.element_ty))
            vsrc = qkv_ptr + t * stride_t + (HQ + HKV + kh) * D
            vdst = v_ptr + slot * stride_cslot + kh * stride_ch
            tl.store(vdst + d, tl.load(vsrc + d).to(v_ptr.dtype.element_ty))
            tl.store(vdst + HALF + d, tl.load(vsrc + HALF + d).to(v_ptr.dtype.element_ty))


def rope_cache_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slots: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """The fused q|k|v projection qkv [N, (HQ + 2 HKV) * D] of N new tokens at angles cos, sin [N, D] (float32,
    rotate-half layout): returns the rotated queries q [N, HQ, D] and writes the rotated keys and the values
    into one layer's paged cache k_cache, v_cache [num_pages, page_size, HKV, D] at the flat slots [N]
    (page * page_size + offset; a negative slot writes nothing)."""
    N = qkv.shape[0]
    P, S, HKV, D = k_cache.shape
    check_head_dim(D)
    if HKV != n_kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"rope_cache_write: caches {list(k_cache.shape)} / {list(v_cache.shape)} do not hold "
                         f"{n_kv_heads} KV heads")
    if qkv.dim() != 2 or qkv.shape[1] != (n_heads + 2 * n_kv_heads) * D or qkv.stride(-1) != 1:
        raise ValueError(f"rope_cache_write: qkv must be [N, {(n_heads + 2 * n_kv_heads) * D}] with a contiguous "
                         f"last dim, got {list(qkv.shape)}")
    if cos.shape != (N, D) or sin.shape != (N, D) or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError(f"rope_cache_write: cos and sin must be [{N}, {D}] alike, got {list(cos.shape)}, "
                         f"{list(sin.shape)}")
    if slots.shape != (N,):
        raise ValueError(f"rope_cache_write: slots must be [{N}], got {list(slots.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(0) != S * c.stride(1) or c.stride(3) != 1 or c.stride() != k_cache.stride():
            raise ValueError(f"rope_cache_write: {name} must be contiguous pages of [page_size, HKV, D] rows")
    q = torch.empty(N, n_heads, D, device=qkv.device, dtype=qkv.dtype)
    if N == 0:
        return q
    rope_cache_kernel[(N, n_heads + n_kv_heads)](
        qkv, cos, sin, q, k_cache, v_cache, slots,
        qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2),
        HQ=n_heads, HKV=n_kv_heads, D=D, num_warps=1)
    return q
