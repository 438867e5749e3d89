"""IVF search in torch for indexes larger than GPU memory (the GPU IVF path when faiss-gpu is absent).

The coarse centroids live on the device; the vectors stay in HOST memory (pinned on CUDA), packed list by
list (rows of list l are packed[offsets[l]:offsets[l+1]], their chunk ids ids[...]). For a query batch:

1. coarse search on the device: top-nprobe centroids by inner product (float32);
2. the probed lists (their union over the batch) are cut into chunks of at most `max_gpu_bytes / 4`
   bytes; runs of adjacent lists (gaps of up to `merge_gap` unprobed rows merged in) are copied with
   non_blocking copies on a side stream into one of two device buffers (double buffering: chunk c+1 is
   copied while chunk c is scored);
3. each chunk is scored exactly (`q @ x.T`, fp16 inputs, fp32 accumulation on CUDA; float32 on CPU) in
   column blocks that fit the other half of the budget, masked to the lists each query probes (and to its
   excluded id ranges), and merged into a running top-k.

So results are IVF-Flat's at the same nprobe (exact inner products over the probed lists), whatever the
budget. `from_faiss` reads a trained FAISS IVF index's centroids and inverted lists (ids = rows of the
float16 embeddings, which are re-read for exact scores, so IVF*,SQ8 codes are not needed).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UserError
from .common import Ranges, SearchResult, check_k, range_arrays

DEFAULT_MAX_GPU_BYTES = 2 << 30


class TorchIVFSearcher:
    def __init__(self, packed, ids, offsets, centroids, nprobe: int = 1, device: str | None = None,
                 max_gpu_bytes: int = DEFAULT_MAX_GPU_BYTES, merge_gap: int = 2048):
        import torch

        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {device}: CUDA is not available here")
        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        packed = torch.as_tensor(packed) if not isinstance(packed, torch.Tensor) else packed
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)) if not isinstance(ids, torch.Tensor) else ids.long()
        offsets = np.asarray(offsets, dtype=np.int64)
        self.n, self.dim = packed.shape
        self.nlist = len(offsets) - 1
        if offsets[0] != 0 or offsets[-1] != self.n or (np.diff(offsets) < 0).any() or len(ids) != self.n:
            raise UserError("TorchIVFSearcher: offsets must run from 0 to n rows, non-decreasing, one id per row")
        lists = np.repeat(np.arange(self.nlist, dtype=np.int32), np.diff(offsets))
        self.dtype = torch.float16 if self.cuda else torch.float32
        if self.cuda:
            packed = packed.to(torch.float16)
            if not packed.is_pinned():
                packed = packed.pin_memory()
            ids = ids.pin_memory() if not ids.is_pinned() else ids
            self.lists = torch.from_numpy(lists).pin_memory()
        else:
            self.lists = torch.from_numpy(lists)
        self.packed, self.ids, self.offsets = packed, ids, offsets
        self.centroids = torch.as_tensor(np.asarray(centroids, dtype=np.float32)).to(self.device)
        self.nprobe = int(nprobe)
        if not 1 <= self.nprobe:
            raise UserError(f"nprobe {nprobe!r}: expected a positive integer")
        self.max_gpu_bytes = int(max_gpu_bytes)
        self.merge_gap = int(merge_gap)
        row_bytes = self.dim * packed.element_size() + 8 + 4
        self.chunk_rows = max(1, (self.max_gpu_bytes // 4) // row_bytes)
        self._bufs = None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_assignment(cls, emb: np.ndarray, centroids: np.ndarray, assign: np.ndarray, **kw) -> "TorchIVFSearcher":
        """Rows of `emb` (float16/32 [n, dim], a memmap is fine) in list `assign[i]` of len(centroids) lists."""
        nlist = len(centroids)
        assign = np.asarray(assign, dtype=np.int64)
        perm = np.argsort(assign, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=nlist))])
        return cls._pack(emb, perm, offsets, centroids, **kw)

    @classmethod
    def _pack(cls, emb, perm, offsets, centroids, device=None, **kw):
        import torch

        cuda = (device in (None, "auto") and torch.cuda.is_available()) or str(device).startswith("cuda")
        dtype = torch.float16 if cuda else torch.float32
        packed = torch.empty((len(perm), emb.shape[1]), dtype=dtype, pin_memory=cuda)
        view = packed.numpy()
        for lo in range(0, len(perm), 1 << 18):
            sel = perm[lo: lo + (1 << 18)]
            order = np.argsort(sel)   # read the memmap in increasing row order
            view[lo + order] = np.asarray(emb[sel[order]], dtype=view.dtype)
        return cls(packed, torch.from_numpy(np.asarray(perm, np.int64)), offsets, centroids, device=device, **kw)

    @classmethod
    def from_faiss(cls, index, emb: np.ndarray, nprobe: int | None = None, **kw) -> "TorchIVFSearcher":
        """A trained FAISS IVF index (any codes; ids = rows of `emb`) over the vectors of `emb`."""
        import faiss

        if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
            raise UserError("torch-ivf: FAISS indexes with a pre-transform (PCA, OPQ, ...) are not supported")
        ivf = faiss.extract_index_ivf(index)
        if ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise UserError("torch-ivf: expected an inner-product IVF index")
        nlist = ivf.nlist
        centroids = ivf.quantizer.reconstruct_n(0, nlist)
        inv = ivf.invlists
        sizes = np.array([inv.list_size(i) for i in range(nlist)], dtype=np.int64)
        perm = np.empty(int(sizes.sum()), dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        for i in range(nlist):
            if sizes[i]:
                perm[offsets[i]: offsets[i + 1]] = faiss.rev_swig_ptr(inv.get_ids(i), int(sizes[i]))
        if len(perm) != len(emb) or (len(perm) and (perm.min() < 0 or perm.max() >= len(emb))):
            raise UserError("torch-ivf: the IVF lists' ids are not the rows of the embeddings")
        nprobe = nprobe if nprobe is not None else int(ivf.nprobe)
        return cls._pack(emb, perm, offsets, centroids, nprobe=nprobe, **kw)

    @property
    def ntotal(self) -> int:
        return self.n

    # -- search ------------------------------------------------------------------------------------
    def _plan(self, probed: np.ndarray) -> list[list[tuple[int, int]]]:
        """Chunks (lists of (row_lo, row_hi) runs, at most chunk_rows rows each) covering the probed lists."""
        lo = self.offsets[probed]
        hi = self.offsets[probed + 1]
        keep = hi > lo
        runs: list[list[int]] = []
        for a, b in zip(lo[keep].tolist(), hi[keep].tolist()):
            if runs and a - runs[-1][1] <= self.merge_gap and b - runs[-1][0] <= self.chunk_rows:
                runs[-1][1] = b
            else:
                runs.append([a, b])
        chunks: list[list[tuple[int, int]]] = []
        cur: list[tuple[int, int]] = []
        used = 0
        for a, b in runs:
            while a < b:
                take = min(b - a, self.chunk_rows - used)
                cur.append((a, a + take))
                used += take
                a += take
                if used == self.chunk_rows:
                    chunks.append(cur)
                    cur, used = [], 0
        if cur:
            chunks.append(cur)
        return chunks

    def _buffers(self):
        torch = self.torch
        if self._bufs is None:
            r = self.chunk_rows
            self._bufs = [(torch.empty((r, self.dim), dtype=self.dtype, device=self.device),
                           torch.empty(r, dtype=torch.int64, device=self.device),
                           torch.empty(r, dtype=torch.int32, device=self.device)) for _ in range(2)]
        return self._bufs

    def search(self, q: np.ndarray, k: int, exclude: Sequence[Ranges] | None = None,
               nprobe: int | None = None) -> SearchResult:
        torch = self.torch
        q = np.asarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UserError(f"queries: expected shape [m, {self.dim}], got {list(q.shape)}")
        k = check_k(k, self.n)
        nprobe = min(self.nlist, int(nprobe or self.nprobe))
        m = len(q)
        dev = self.device
        q32 = torch.from_numpy(q).to(dev)
        qt = q32.to(self.dtype)
        probe = torch.topk(q32 @ self.centroids.T, nprobe, dim=1).indices          # [m, nprobe]
        pmask = torch.zeros((m, self.nlist), dtype=torch.bool, device=dev)
        pmask.scatter_(1, probe, True)
        probed = np.flatnonzero(pmask.any(0).cpu().numpy())
        ranges = range_arrays(exclude, m)
        if ranges is not None:
            lo_t = torch.from_numpy(ranges[0]).to(dev)
            hi_t = torch.from_numpy(ranges[1]).to(dev)
        best_s = torch.full((m, k), float("-inf"), device=dev)
        best_i = torch.full((m, k), -1, dtype=torch.int64, device=dev)
        # column block: fp16 + fp32 scores, masks and top-k temporaries (~12 B per score) within half the budget
        cols = max(256, min(self.chunk_rows, (self.max_gpu_bytes // 2) // max(1, m * 12)))
        bufs = self._buffers()
        copy_stream = torch.cuda.Stream(device=dev) if self.cuda else None
        free = [None, None]
        for c, runs in enumerate(self._plan(probed)):
            xb, ib, lb = bufs[c % 2]
            if copy_stream is not None:
                with torch.cuda.stream(copy_stream):
                    if free[c % 2] is not None:
                        copy_stream.wait_event(free[c % 2])
                    r = self._copy(runs, xb, ib, lb)
                    ready = torch.cuda.Event()
                    ready.record(copy_stream)
                torch.cuda.current_stream(dev).wait_event(ready)
            else:
                r = self._copy(runs, xb, ib, lb)
            for c0 in range(0, r, cols):
                c1 = min(r, c0 + cols)
                s = (qt @ xb[c0:c1].T).float()
                mask = ~pmask[:, lb[c0:c1].long()]
                if ranges is not None:
                    idc = ib[c0:c1]
                    for j in range(lo_t.shape[1]):
                        mask |= (idc[None, :] >= lo_t[:, j:j + 1]) & (idc[None, :] < hi_t[:, j:j + 1])
                s.masked_fill_(mask, float("-inf"))
                ts, tp = torch.topk(s, min(k, c1 - c0), dim=1)
                cand_s = torch.cat([best_s, ts], 1)
                cand_i = torch.cat([best_i, ib[c0:c1][tp]], 1)
                best_s, pos = torch.topk(cand_s, k, dim=1)
                best_i = torch.gather(cand_i, 1, pos)
            if copy_stream is not None:
                free[c % 2] = torch.cuda.Event()
                free[c % 2].record(torch.cuda.current_stream(dev))
        best_i = torch.where(torch.isfinite(best_s), best_i, torch.full_like(best_i, -1))
        return SearchResult(best_s.cpu().numpy().astype(np.float32), best_i.cpu().numpy())

    def _copy(self, runs, xb, ib, lb) -> int:
        nb = self.cuda
        o = 0
        for a, b in runs:
            xb[o: o + b - a].copy_(self.packed[a:b], non_blocking=nb)
            ib[o: o + b - a].copy_(self.ids[a:b], non_blocking=nb)
            lb[o: o + b - a].copy_(self.lists[a:b], non_blocking=nb)
            o += b - a
        return o
