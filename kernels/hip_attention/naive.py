"""Plain PyTorch references for hip_attention: the representative-key scorer, and the attention
itself given the selected blocks (dense attention under the block mask)."""

from __future__ import annotations

import torch

from ..block_sparse.naive import block_sparse_attention_naive
from ..flash_decode.naive import flash_decode_naive, gather_cache


def score_naive(q, k, rep, block_size_q, group_heads, block_table=None):
    """Same contract as ops.score_triton: rep [B, HS, NQB, C] -> [B, HS, NQB, C] float32."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    GS = G if group_heads else 1
    _, HS, NQB, C = rep.shape
    out = torch.full(rep.shape, float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        if block_table is None:
            kb = k[b]
        else:
            kb = gather_cache(k, b, block_table.shape[1] * k.shape[1], block_table)[0]
        for hs in range(HS):
            hk = hs * GS // G
            heads = list(range(hs * GS, hs * GS + GS))
            for qb in range(NQB):
                t0, t1 = qb * block_size_q, min(T, (qb + 1) * block_size_q)
                if t1 <= t0:
                    continue
                rows = q[b, t0:t1, heads].reshape(-1, D).double()  # [rows, D]
                pos = rep[b, hs, qb].long()
                ok = pos >= 0
                keys = kb[pos.clamp(min=0), hk].double()  # [C, D]
                s = (rows @ keys.T).amax(0).float()
                out[b, hs, qb] = torch.where(ok, s, torch.full_like(s, float("-inf")))
    return out


def hip_attention_naive(q, k, v, block_idx, block_cnt, block_size_q, block_size_k, causal=True, scale=None):
    """Reference for hip_attention_prefill given its block lists."""
    return block_sparse_attention_naive(q, k, v, block_idx, block_cnt, block_size_q, block_size_k, causal, scale)


def hip_decode_naive(q, k_cache, v_cache, sel, seqlens=None, block_table=None, block_size_k=64,
                     n_sink=1, n_local=4, scale=None):
    """Reference for hip_decode."""
    return flash_decode_naive(q, k_cache, v_cache, seqlens, block_table, scale, sel=sel,
                              n_sink=n_sink, n_local=n_local, block_n=block_size_k)


def bound_score_naive(q, k, cs, ce, block_size_q, block_size_k, group_heads):
    """Upper bound of q . k over the keys of block ranges [cs, ce) (Quest bound), directly from the
    keys: max over the unit's queries of sum_d max(q_d * max_k k_d, q_d * min_k k_d). -inf if empty."""
    B, T, HQ, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    G = HQ // HKV
    GS = G if group_heads else 1
    _, HS, NQB, C = cs.shape
    out = torch.full(cs.shape, float("-inf"), dtype=torch.float32)
    for b in range(B):
        for hs in range(HS):
            hk = hs * GS // G
            heads = list(range(hs * GS, hs * GS + GS))
            for qb in range(NQB):
                t0, t1 = qb * block_size_q, min(T, (qb + 1) * block_size_q)
                rows = q[b, t0:t1, heads].reshape(-1, D).double()
                for c in range(C):
                    a, e = int(cs[b, hs, qb, c]), int(ce[b, hs, qb, c])
                    if e <= a:
                        continue
                    keys = k[b, a * block_size_k : min(S, e * block_size_k), hk].double()
                    kx, kn = keys.amax(0), keys.amin(0)
                    out[b, hs, qb, c] = torch.maximum(rows * kx, rows * kn).sum(-1).max().float()
    return out
