"""Helpers shared by the kernels: launch-mode detection and input checks."""

from __future__ import annotations

import os

import torch
import triton

# exp(x) == exp2(x * LOG2E): the kernels work in base 2 (exp2 is the native instruction).
LOG2E = 1.4426950408889634


def is_interpret() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_head_dim(d: int) -> None:
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {d} not supported: use 16, 32, 64, 128 or 256")


def check_last_dim_contiguous(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.stride(-1) != 1:
            raise ValueError("the head dimension (last) must be contiguous")


def check_gqa(hq: int, hkv: int) -> int:
    if hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return hq // hkv


def default_scale(d: int, scale: float | None) -> float:
    return d**-0.5 if scale is None else float(scale)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def tma_ok(device: torch.device, *ts: torch.Tensor) -> bool:
    """Bulk tensor copies for the K/V tiles: Hopper or newer, row strides in whole 16 bytes (TMA's rule).
    Device-side descriptors need Triton's scratch allocator: a torch one is installed unless the
    application set its own."""
    if device.type != "cuda" or is_interpret() or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    if any(t.data_ptr() % 16 or any(x * t.element_size() % 16 for x in t.stride()[:-1]) for t in ts):
        return False
    try:
        from triton.runtime import _allocation

        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            triton.set_allocator(_torch_scratch)
    except (ImportError, AttributeError):  # another Triton: no way to tell whether one is set
        return False
    return True
