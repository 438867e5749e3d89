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


def hip_decode_select_naive(q, k_cache, seqlens, max_seqlen, block_size_k=64, topk=32, n_sink=1, n_local=4,
                            n_rep=1, block_table=None):
    """Reference for hip_decode_select (hip_select's iterative halving, one list per sequence and KV
    head): the middle key blocks [n_sink, nkb - n_local) are cut into topk segments; each step halves
    every segment, scores each half by the largest q . k of its n_rep representative keys over all
    TQ tokens x G query heads, and keeps the topk best halves (ties: the earlier half), for as many
    steps as the longest sequence needs. Returns [B, HKV, topk] int32, ascending, -1 padded."""
    B, TQ, HQ, D = q.shape
    HKV = k_cache.shape[2]
    G = HQ // HKV
    bk = block_size_k
    m_max = max(0, -(-max_seqlen // bk) - n_local - n_sink)
    l_max = -(-m_max // topk)
    n_iter = (l_max - 1).bit_length() if l_max > 1 else 0
    sel = torch.full((B, HKV, topk), -1, dtype=torch.int32)
    for b in range(B):
        L = int(seqlens[b])
        keys = gather_cache(k_cache, b, L, block_table)[0].double()  # [L, HKV, D]
        M = max(-(-L // bk) - n_local - n_sink, 0)
        for hk in range(HKV):
            rows = q[b, :, hk * G : (hk + 1) * G].reshape(-1, D).double()

            def score(seg):
                s, e = seg
                pos = [s * bk + ((e - s) * bk * (2 * r + 1)) // (2 * n_rep) for r in range(n_rep)]
                pos = [p for p in pos if p < L]
                if e <= s or not pos:
                    return float("-inf")
                return (rows @ keys[pos, hk].T).max().item()

            segs = [(n_sink + M * i // topk, n_sink + M * (i + 1) // topk) for i in range(topk)]
            for _ in range(n_iter):
                cand = [half for s, e in segs for half in ((s, s + (e - s + 1) // 2), (s + (e - s + 1) // 2, e))]
                segs = sorted(cand, key=score, reverse=True)[:topk]  # stable sort: ties keep order
            starts = sorted(s for s, e in segs if e > s)
            sel[b, hk, : len(starts)] = torch.tensor(starts, dtype=torch.int32)
    return sel


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
