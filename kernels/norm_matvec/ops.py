"""norm_matvec as one Triton kernel: each program recomputes the row's norm (the row is a few KB) and reduces a
block of W's rows against it; program 0 of a row also stores x + residual. Saves the norm's kernel and its
round trip before each of the layer's two input projections; with SwiGLU, also the gate kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import is_interpret, next_pow2


@triton.jit
def _stream(x_row, r_row, cols, m, HAS_RESIDUAL: tl.constexpr):
    """The columns cols of the stream x + residual, rounded to x's dtype as torch's add."""
    h = tl.load(x_row + cols, mask=m, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_row + cols, mask=m, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
    return h


@triton.jit
def norm_matvec_kernel(x_ptr, r_ptr, nw_ptr, w_ptr, y_ptr, h_ptr, K, n_out, eps,
                       stride_x, stride_r, stride_w, stride_y, stride_h,
                       HAS_RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    # pass 1: the stream h = x + residual (rounded as torch's add) and its mean square
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = cols < K
        h = _stream(x_ptr + row * stride_x, r_ptr + row * stride_r, cols, m, HAS_RESIDUAL)
        if HAS_RESIDUAL and pid == 0:
            tl.store(h_ptr + row * stride_h + cols, h, mask=m)
        hf = h.to(tl.float32)
        ss += hf * hf
    rs = tl.math.rsqrt(tl.sum(ss, axis=0) / K + eps)
    # pass 2: W's rows of this block against the normed row (rounded as transformers' norm: twice)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = n < n_out
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = cols < K
        h = _stream(x_ptr + row * stride_x, r_ptr + row * stride_r, cols, m, HAS_RESIDUAL)
        hn = (h.to(tl.float32) * rs).to(dt)
        nw = tl.load(nw_ptr + cols, mask=m, other=0.0)
        xn = (nw.to(tl.float32) * hn.to(tl.float32)).to(dt).to(tl.float32)
        wm = mn[:, None] & m[None, :]
        w = tl.load(w_ptr + n[:, None] * stride_w + cols[None, :], mask=wm, other=0.0)
        acc += tl.sum(w.to(tl.float32) * xn[None, :], axis=1)
        if SWIGLU:
            wu = tl.load(w_ptr + (n + n_out)[:, None] * stride_w + cols[None, :], mask=wm, other=0.0)
            acc_up += tl.sum(wu.to(tl.float32) * xn[None, :], axis=1)
    y = acc.to(dt)
    if SWIGLU:
        g = y.to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt)
        y = (s.to(tl.float32) * acc_up.to(dt).to(tl.float32)).to(dt)
    tl.store(y_ptr + row * stride_y + n, y, mask=mn)


def norm_matvec(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                residual: torch.Tensor | None = None, swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (+ residual [M, K]), the norm's weight [K], the projection's weight [N, K] (no bias) ->
    (y [M, N], or [M, N / 2] with swiglu: silu(gate) * up of its halves; h = x + residual [M, K], x when None).
    Same results as norm_matvec_naive. Reads W once per row: for the few rows of a decode step."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"norm_matvec: x must be [M, K] with a contiguous last dim, got {list(x.shape)}")
    M, K = x.shape
    if weight.dim() != 2 or weight.shape[1] != K or weight.stride(-1) != 1:
        raise ValueError(f"norm_matvec: weight must be [N, {K}] with a contiguous last dim, got {list(weight.shape)}")
    if norm_weight.shape != (K,):
        raise ValueError(f"norm_matvec: norm_weight must be [{K}], got {list(norm_weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"norm_matvec: residual must be {list(x.shape)}, got {list(residual.shape)}")
    n_out = weight.shape[0]
    if swiglu:
        if n_out % 2:
            raise ValueError(f"norm_matvec: swiglu needs an even number of weight rows, got {n_out}")
        n_out //= 2
    y = torch.empty(M, n_out, device=x.device, dtype=x.dtype)
    h = torch.empty_like(x) if residual is not None else x
    if M == 0:
        return y, h
    r = residual if residual is not None else x
    BLOCK_K = min(next_pow2(K), 64 if is_interpret() else 1024)
    BLOCK_N = 16 if is_interpret() else (8 if swiglu else 16)
    norm_matvec_kernel[(triton.cdiv(n_out, BLOCK_N), M)](
        x, r, norm_weight, weight, y, h, K, n_out, eps,
        x.stride(0), r.stride(0), weight.stride(0), y.stride(0), h.stride(0),
        HAS_RESIDUAL=residual is not None, SWIGLU=swiglu, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return y, h
