"""swiglu as one Triton kernel (torch runs silu, then the product: two kernels and a round trip)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def swiglu_kernel(x_ptr, y_ptr, inter, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)                  # silu, rounded as torch's
    y = (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
    tl.store(y_ptr + row * stride_y + cols, y, mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] (gate columns first, then up) -> silu(gate) * up [N, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"swiglu: expected [N, 2I] with a contiguous last dim, got {list(gate_up.shape)}")
    N, two_i = gate_up.shape
    inter = two_i // 2
    y = torch.empty(N, inter, device=gate_up.device, dtype=gate_up.dtype)
    if N == 0:
        return y
    BLOCK = 1024
    swiglu_kernel[(N, triton.cdiv(inter, BLOCK))](gate_up, y, inter, gate_up.stride(0), y.stride(0), BLOCK=BLOCK,
                                                  num_warps=4)
    return y
