"""Plain PyTorch reference for topk_scan: torch.topk(q @ db.T, k) (the baseline the kernel is timed against)."""

from __future__ import annotations

import torch


def topk_scan_naive(q: torch.Tensor, db: torch.Tensor, k: int, block: int | None = None):
    """q [M, D], db [N, D] -> (scores float32 [M, k] descending, ids int64 [M, k]).

    Scores are accumulated in float32 (inputs upcast). `block` splits the database to bound memory."""
    qf = q.float()
    if block is None or block >= db.shape[0]:
        s = qf @ db.float().T
        vals, ids = torch.topk(s, k, dim=1)
        return vals, ids
    best_v = torch.full((q.shape[0], k), float("-inf"), device=q.device)
    best_i = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=q.device)
    for lo in range(0, db.shape[0], block):
        s = qf @ db[lo: lo + block].float().T
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        cv, ci = torch.cat([best_v, v], 1), torch.cat([best_i, i + lo], 1)
        best_v, pos = torch.topk(cv, k, dim=1)
        best_i = torch.gather(ci, 1, pos)
    return best_v, best_i
