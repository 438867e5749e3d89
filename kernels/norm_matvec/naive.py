"""Plain PyTorch reference for norm_matvec."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rmsnorm.naive import rmsnorm_naive
from ..swiglu.naive import swiglu_naive


def norm_matvec_naive(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                      residual: torch.Tensor | None = None, swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(rmsnorm(x + residual), weight), x + residual); with swiglu, silu(gate) * up of that product."""
    h_norm, h = rmsnorm_naive(x, norm_weight, eps, residual)
    y = F.linear(h_norm, weight)
    return (swiglu_naive(y) if swiglu else y), h
