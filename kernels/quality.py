"""Quality of sparse attention against dense attention on given queries/keys (e.g. real ones
captured from a model): attention-mass recall of the kept blocks and output relative error."""

from __future__ import annotations

import torch


def sparse_quality(q, k, v, block_idx, block_cnt, block_size_q, block_size_k, causal=True, scale=None,
                   qblocks=None):
    """q: [T, HQ, D]; k, v: [S, HKV, D] (one sequence); block lists [HI, NQB, MAXK] / [HI, NQB].

    For each query block in `qblocks` (default: all) computes, per head, the dense softmax in float32:
    recall = mass of the attention on the kept keys (mean over queries), and the relative error
    ||o_sparse - o_dense|| / ||o_dense|| of the attention output restricted to the kept keys.
    Returns (recall [HQ], rel_err [HQ]) averaged over the chosen query blocks."""
    T, HQ, D = q.shape
    S, HKV = k.shape[0], k.shape[1]
    G, IG = HQ // HKV, HQ // block_idx.shape[0]
    scale = D**-0.5 if scale is None else scale
    nqb = block_idx.shape[1]
    qblocks = range(nqb) if qblocks is None else qblocks
    rec = torch.zeros(HQ, dtype=torch.float64)
    err_num = torch.zeros(HQ, dtype=torch.float64)
    err_den = torch.zeros(HQ, dtype=torch.float64)
    n_q = 0
    nkb = -(-S // block_size_k)
    for qb in qblocks:
        t0, t1 = qb * block_size_q, min(T, (qb + 1) * block_size_q)
        pos = torch.arange(t0, t1, device=q.device) + S - T
        keys = torch.arange(S, device=q.device)
        vis = keys[None, :] <= pos[:, None] if causal else torch.ones(t1 - t0, S, dtype=torch.bool, device=q.device)
        # [HQ, rows, S]
        s = torch.einsum("thd,shd->hts", q[t0:t1].float(), k.float().repeat_interleave(G, 1)) * scale
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.softmax(s, -1)
        keep_b = torch.zeros(block_idx.shape[0], nkb, dtype=torch.bool, device=q.device)
        for hi in range(block_idx.shape[0]):
            keep_b[hi, block_idx[hi, qb, : int(block_cnt[hi, qb])].long()] = True
        keep = keep_b.repeat_interleave(block_size_k, 1)[:, :S].repeat_interleave(IG, 0)[:, None, :]
        rec += (p * keep).sum(-1).sum(-1).double().cpu()
        vv = v.float().repeat_interleave(G, 1).transpose(0, 1)  # [HQ, S, D]
        o = p @ vv
        ps = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
        os_ = ps @ vv
        err_num += ((os_ - o) ** 2).sum((-1, -2)).double().cpu()
        err_den += (o**2).sum((-1, -2)).double().cpu()
        n_q += t1 - t0
    return rec / max(n_q, 1), (err_num / err_den.clamp(min=1e-30)).sqrt()
