"""Plain PyTorch reference for cca_attention (run it in float64 for checks)."""

from __future__ import annotations

import torch

from ..flash_prefill.naive import attention_naive


def cca_attention_naive(q, k, v, chunk_size, scale=None):
    """Each chunk of q attends, without a causal mask, to its own neighbours k[:, l], v[:, l]."""
    B, T, HQ, D = q.shape
    outs = []
    for l, t0 in enumerate(range(0, T, chunk_size)):
        t1 = min(T, t0 + chunk_size)
        o, _ = attention_naive(q[:, t0:t1], k[:, l], v[:, l], causal=False, scale=scale)
        outs.append(o)
    return torch.cat(outs, 1)
