"""`FaissSearcher`: FAISS search over the chunk embeddings (the `faiss` stage's index), exact re-ranking of
the shortlists of approximate indexes against the float16 embeddings.

`FaissSearcher.search` supports per-query exclusion of chunk-id ranges (a document's chunks are one range):
queries sharing an exclusion are searched together with a FAISS IDSelector; indexes whose search does not
take selectors fall back to over-fetching and filtering.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import IndexFormatError, UserError
from ..handle import Index
from ..stages.faiss import FAISS_INDEX, FAISS_JSON, import_faiss
from .common import Ranges, SearchResult, check_k


class FaissSearcher:
    """A loaded faiss.index with its embeddings (for exact re-ranking)."""

    def __init__(self, index, meta: dict, emb: np.ndarray, nprobe: int | None = None, ef_search: int | None = None,
                 rerank: int | None = None, gpu: bool | str = "auto"):
        self.index = index
        self.meta = meta
        self.emb = emb
        self.exact = bool(meta.get("exact"))
        self.nprobe = nprobe if nprobe is not None else meta.get("nprobe")
        self.ef_search = ef_search if ef_search is not None else meta.get("ef_search")
        self.rerank = int(rerank if rerank is not None else meta.get("rerank") or 1)
        for name, v in (("nprobe", self.nprobe), ("ef_search", self.ef_search), ("rerank", self.rerank)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0):
                raise UserError(f"{name} {v!r}: expected a positive integer")
        self.on_gpu = False
        if gpu:
            self._maybe_to_gpu(gpu == "auto")

    def _maybe_to_gpu(self, quiet: bool) -> None:
        """faiss-gpu when installed: IVF indexes larger than GPU memory stay on the CPU (or use
        faiss's `useFloat16` / sharding); Flat and IVF indexes that fit are cloned to all GPUs."""
        faiss = import_faiss()
        if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
            if not quiet:
                raise UserError("--gpu: faiss has no GPU support here (install the [gpu] extra: faiss-gpu-cu12)")
            return
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True
        self.index = faiss.index_cpu_to_all_gpus(self.index, co)
        self.on_gpu = True

    @classmethod
    def open(cls, index: Index | Path | str, **kw) -> "FaissSearcher":
        """The searcher over an index's faiss stage (kw: nprobe, ef_search, rerank, gpu)."""
        faiss = import_faiss()
        idx = Index.of(index)
        idx.require("faiss")
        index_dir, emb = idx.dir, idx.embeddings
        meta = json.loads((index_dir / FAISS_JSON).read_text())
        try:
            fi = faiss.read_index(str(index_dir / FAISS_INDEX), faiss.IO_FLAG_MMAP if meta.get("exact") else 0)
        except RuntimeError as e:
            raise IndexFormatError(f"{index_dir / FAISS_INDEX}: unreadable FAISS index ({str(e).strip().splitlines()[-1]})") from None
        n_chunks = int(idx.manifest.stages["chunks"].counts["chunks"]) if idx.has("chunks") else -1
        if fi.ntotal != len(emb) or fi.ntotal != n_chunks or fi.d != emb.shape[1]:
            raise IndexFormatError(f"{index_dir / FAISS_INDEX}: holds {fi.ntotal} vectors of dim {fi.d}, the "
                                   f"chunk table has {n_chunks} chunks and the embeddings dim {emb.shape[1]}; "
                                   "rebuild it with `retrogram build-index --stages faiss --force`")
        return cls(fi, meta, emb, **kw)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _params(self, sel):
        faiss = import_faiss()
        if faiss.try_extract_index_ivf(self.index) is not None:
            p = faiss.SearchParametersIVF()
            if self.nprobe:
                p.nprobe = int(self.nprobe)
        elif "HNSW" in type(faiss.downcast_index(self.index)).__name__:
            p = faiss.SearchParametersHNSW()
            if self.ef_search:
                p.efSearch = int(self.ef_search)
        else:
            p = faiss.SearchParameters()
        if sel is not None:
            p.sel = sel
        return p

    def _base_search(self, q: np.ndarray, kk: int, ranges: Ranges):
        faiss = import_faiss()
        sel = keep = None
        if ranges:
            if len(ranges) == 1:
                keep = faiss.IDSelectorRange(int(ranges[0][0]), int(ranges[0][1]))
            else:
                ids = np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in ranges])
                keep = faiss.IDSelectorBatch(ids)
            sel = faiss.IDSelectorNot(keep)
        try:
            return self.index.search(q, kk, params=self._params(sel))
        except RuntimeError:
            if sel is None:
                raise
        # no selector support: over-fetch and filter, doubling until k survive or the index is exhausted
        excluded = sum(hi - lo for lo, hi in ranges)
        fetch = min(self.ntotal, kk + excluded)
        D, I = self.index.search(q, fetch, params=self._params(None))
        mask = np.zeros_like(I, dtype=bool)
        for lo, hi in ranges:
            mask |= (I >= lo) & (I < hi)
        I = np.where(mask, -1, I)
        D = np.where(mask, -np.inf, D).astype(np.float32)
        order = np.argsort(I < 0, axis=1, kind="stable")[:, :kk]
        return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)

    def search(self, q: np.ndarray, k: int, exclude: Sequence[Ranges] | None = None) -> SearchResult:
        """Top-k chunk ids by inner product for each query row of `q` (float32 [m, dim]).

        exclude: one tuple of (lo, hi) chunk-id ranges per query, left out of its results."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        m = len(q)
        k = check_k(k, self.ntotal)
        kk = k if self.exact else min(self.ntotal, k * self.rerank)   # rerank 1: the index's own scores
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        ids = np.full((m, k), -1, dtype=np.int64)
        groups: dict[Ranges, list[int]] = {}
        for i in range(m):
            groups.setdefault(tuple(exclude[i]) if exclude is not None else (), []).append(i)
        for ranges, rows in groups.items():
            rows = np.asarray(rows)
            D, I = self._base_search(q[rows], kk, ranges)
            if not self.exact and self.rerank > 1:
                D, I = self._rerank(q[rows], I, k)
            n = min(k, I.shape[1])
            scores[rows, :n] = D[:, :n]
            ids[rows, :n] = I[:, :n]
        return SearchResult(scores, ids)

    def _rerank(self, q: np.ndarray, I: np.ndarray, k: int):
        """Exact inner products of the shortlist against the stored float16 embeddings, on as many threads as
        FAISS searches with (`faiss.omp_get_max_threads()`): blocks of RERANK_BLOCK queries on a thread pool, each block's
        gather, float16 -> float32 cast, batched dot products and top-k in numpy calls that release the GIL."""
        m, kk = I.shape
        kout = min(k, kk)
        scores = np.empty((m, kout), np.float32)
        ids = np.empty((m, kout), np.int64)
        bounds = list(range(0, m, RERANK_BLOCK)) + [m]
        blocks = list(zip(bounds[:-1], bounds[1:]))

        def work(b):
            _rerank_block(self.emb, q[b[0]:b[1]], I[b[0]:b[1]], kout, scores[b[0]:b[1]], ids[b[0]:b[1]])

        nt = min(_omp_threads(), len(blocks))
        if nt <= 1:
            for b in blocks:
                work(b)
        else:
            list(_pool(nt).map(work, blocks))
        return scores, ids


RERANK_BLOCK = 32         # queries per re-ranking block (its float32 shortlist vectors stay in cache)
_POOL: list = [None, 0]


def _omp_threads() -> int:
    try:
        return max(1, int(import_faiss().omp_get_max_threads()))
    except Exception:
        return 1


def _pool(n: int):
    from concurrent.futures import ThreadPoolExecutor

    if _POOL[1] != n:
        if _POOL[0] is not None:
            _POOL[0].shutdown(wait=False)
        _POOL[0], _POOL[1] = ThreadPoolExecutor(n, thread_name_prefix="rerank"), n
    return _POOL[0]


def _rerank_block(emb: np.ndarray, q: np.ndarray, I: np.ndarray, k: int, out_s: np.ndarray, out_i: np.ndarray) -> None:
    """Exact top-k of one block of queries' shortlists I ([m, kk], -1 = none) into out_s / out_i ([m, k])."""
    valid = I >= 0
    safe = np.where(valid, I, 0)
    vecs = np.take(emb, safe.ravel(), axis=0).astype(np.float32).reshape(*safe.shape, -1)
    D = np.matmul(vecs, q[:, :, None])[:, :, 0]
    D[~valid] = -np.inf
    if k < D.shape[1]:
        part = np.argpartition(-D, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(part, np.argsort(-np.take_along_axis(D, part, 1), axis=1, kind="stable"), 1)
    else:
        order = np.argsort(-D, axis=1, kind="stable")
    out_s[:] = np.take_along_axis(D, order, 1)
    out_i[:] = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(I, order, 1), -1)
