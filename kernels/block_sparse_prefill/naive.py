"""Plain PyTorch references for block_sparse_prefill."""

from __future__ import annotations

import math

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


def mass_vertical_slash_scores_naive(mass, T, S, block_size_q=64, block_size_k=64, causal=True):
    """Loop-form reference of ops.mass_vertical_slash_scores (float64): per key block the mean mass over
    the query blocks that see it; per block-diagonal the mean mass over the (query block, key block)
    pairs whose centres lie on it."""
    B, H, NQB, NKB = mass.shape
    vert = torch.zeros(B, H, NKB, dtype=torch.float64)
    slash = torch.zeros(B, H, NKB, dtype=torch.float64)
    nv = torch.zeros(NKB)
    ns = torch.zeros(NKB)
    delta = S - T if causal else 0
    for qb in range(NQB):
        t0, t1 = qb * block_size_q, min(T, (qb + 1) * block_size_q) - 1
        kend = min(S, t1 + 1 + delta) if causal else S
        for kb in range(-(-kend // block_size_k)):
            k0, k1 = kb * block_size_k, min(S, (kb + 1) * block_size_k) - 1
            m = mass[:, :, qb, kb].double().cpu()
            vert[:, :, kb] += m
            nv[kb] += 1
            d = math.floor(((t0 + t1) / 2 + delta - (k0 + k1) / 2) / block_size_k)
            if 0 <= d < NKB:
                slash[:, :, d] += m
                ns[d] += 1
    return vert / nv.clamp(min=1), slash / ns.clamp(min=1)
