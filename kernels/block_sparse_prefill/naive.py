"""Plain PyTorch references for block_sparse_prefill."""

from __future__ import annotations

import torch

from ..block_sparse.naive import block_sparse_attention_naive
from ..flash_prefill.naive import attention_naive


def block_sparse_prefill_naive(q, k, v, block_idx, block_cnt, block_size_q, block_size_k, causal=True, scale=None):
    """Reference for block_sparse_prefill given its block lists."""
    return block_sparse_attention_naive(q, k, v, block_idx, block_cnt, block_size_q, block_size_k, causal, scale)


def vertical_slash_scores_naive(q, k, last_q=64, scale=None, causal=True, block_size_k=64):
    """Loop-form reference of ops.vertical_slash_scores (float64)."""
    B, T, HQ, D = q.shape
    S = k.shape[1]
    nkb = -(-S // block_size_k)
    L = min(last_q, T)
    # [B, L, HQ] rows of the softmax over keys
    _, lse = attention_naive(q[:, T - L:], k, k, causal=False, scale=scale)
    G = HQ // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    vert = torch.zeros(B, HQ, nkb, dtype=torch.float64)
    slash = torch.zeros(B, HQ, nkb, dtype=torch.float64)
    for b in range(B):
        for h in range(HQ):
            for i in range(L):
                pos = T - L + i + (S - T)
                ks = k[b, : (pos + 1 if causal else S), h // G].double()
                s = (ks @ q[b, T - L + i, h].double()) * scale
                p = torch.softmax(s, 0)
                for j in range(ks.shape[0]):
                    vert[b, h, j // block_size_k] += p[j]
                    o = pos - j
                    if 0 <= o < S:
                        slash[b, h, o // block_size_k] += p[j]
    return vert, slash
