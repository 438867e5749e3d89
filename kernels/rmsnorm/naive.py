"""Plain PyTorch reference for rmsnorm: transformers' LlamaRMSNorm, with an optional residual add before it."""

from __future__ import annotations

import torch


def rmsnorm_naive(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, dim] (+ residual [N, dim]) -> (normed [N, dim], h [N, dim]) where h = x + residual (x when None).

    The norm runs in float32 and is rounded to x's dtype before the weight multiplies it, as transformers does.
    """
    h = x if residual is None else x + residual
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype), h
