"""What every searcher shares: the result type, the exclusion ranges, the k check, and the brute-force
numpy reference (`exact_search`) that each searcher is tested against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UserError

Ranges = tuple[tuple[int, int], ...]


@dataclass
class SearchResult:
    """scores float32 [m, k] (-inf where fewer than k were found) and ids int64 [m, k] (-1 there)."""

    scores: np.ndarray
    ids: np.ndarray


def check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise UserError(f"k {k!r}: expected a positive integer")
    if k <= 0:
        raise UserError(f"k {k}: expected a positive number of neighbours")
    if k > n:
        raise UserError(f"k {k}: larger than the index ({n} chunks)")
    return int(k)


def range_arrays(exclude: Sequence[Ranges] | None, m: int) -> tuple[np.ndarray, np.ndarray] | None:
    if exclude is None or not any(exclude):
        return None
    r = max(len(x) for x in exclude)
    lo = np.zeros((m, r), dtype=np.int64)
    hi = np.zeros((m, r), dtype=np.int64)
    for i, ranges in enumerate(exclude):
        for j, (a, b) in enumerate(ranges):
            lo[i, j], hi[i, j] = a, b
    return lo, hi


def exact_search(emb: np.ndarray, q: np.ndarray, k: int, exclude: Sequence[Ranges] | None = None,
                 block: int = 262_144) -> SearchResult:
    """Brute-force reference (numpy, blocked over the database): exact top-k by inner product."""
    q = np.asarray(q, dtype=np.float32)
    m, n = len(q), len(emb)
    k = check_k(k, n)
    best_s = np.full((m, k), -np.inf, dtype=np.float32)
    best_i = np.full((m, k), -1, dtype=np.int64)
    for lo in range(0, n, block):
        x = np.asarray(emb[lo: lo + block], dtype=np.float32)
        s = q @ x.T
        if exclude is not None:
            for i, ranges in enumerate(exclude):
                for a, b in ranges:
                    a2, b2 = max(a, lo), min(b, lo + len(x))
                    if a2 < b2:
                        s[i, a2 - lo: b2 - lo] = -np.inf
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(lo, lo + len(x)), s.shape)], axis=1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cand_s, top, 1)
        best_i = np.take_along_axis(cand_i, top, 1)
    best_i = np.where(np.isfinite(best_s), best_i, -1)
    return SearchResult(best_s, best_i)
