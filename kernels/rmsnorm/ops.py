"""rmsnorm as one Triton kernel: one program a row reads x (and the residual), writes the sum and its norm.

Decoding one token, a layer's elementwise work is a string of tiny kernels whose launch gaps cost more than
their reads; fusing the add and the norm's six ops into one is most of what makes a decode step short.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import next_pow2


@triton.jit
def rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, dim, eps,
                   stride_x, stride_r, stride_y, stride_h,
                   HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # rounded to the model's dtype, as x + residual in torch
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / dim
    n = (hf * tl.math.rsqrt(var + eps)).to(x.dtype)          # rounded before the weight, as transformers
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (w.to(tl.float32) * n.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + cols, y, mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, dim] (+ residual [N, dim]) -> (normed [N, dim], h = x + residual [N, dim]; x itself when None).
    Same arguments and results as rmsnorm_naive."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"rmsnorm: x must be [N, dim] with a contiguous last dim, got {list(x.shape)}")
    N, dim = x.shape
    if weight.shape != (dim,):
        raise ValueError(f"rmsnorm: weight must be [{dim}], got {list(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"rmsnorm: residual must be {list(x.shape)} with a contiguous last dim, "
                         f"got {list(residual.shape)}")
    y = torch.empty(N, dim, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    h = torch.empty_like(x) if residual is not None else x
    if N == 0:
        return y, h
    r = residual if residual is not None else x
    BLOCK = next_pow2(dim)
    rmsnorm_kernel[(N,)](x, r, weight, y, h, dim, eps, x.stride(0), r.stride(0), y.stride(0), h.stride(0),
                         HAS_RESIDUAL=residual is not None, BLOCK=BLOCK, num_warps=min(8, max(1, BLOCK // 256)))
    return y, h
