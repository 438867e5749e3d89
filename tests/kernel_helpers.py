"""What the kernel tests share: the device they run on, fresh random inputs, NaN-poisoned outputs and the
relative error against a float64 reference (CPU: Triton interpreter, float32)."""

import os

import torch

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"
DTYPE = torch.float32  # the interpreter computes bf16 wrongly
TOL = 1e-4


def rel(out, ref):
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN output"
    return ((out.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def rnd(*shape):
    return torch.randn(*shape, device=DEV, dtype=DTYPE)


def poisoned(like):
    return torch.full(like.shape, float("nan"), device=like.device, dtype=like.dtype)
