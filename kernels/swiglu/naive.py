"""Plain PyTorch reference for swiglu."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_naive(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] (gate columns first, then up) -> silu(gate) * up [N, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
