"""Exact inner-product search in torch: the CUDA path when faiss-gpu is absent, and the vectorised engine
for `neighbours` precomputation (each query excludes its own document's chunk range).

On CUDA the database is held in float16 on the device and, when no exclusion is asked for, scanned by the
fused Triton scan + top-k kernel (`retrogram.kernels.topk_scan`); otherwise `q @ db.T` per block, masked,
then `torch.topk`, merged across blocks. On CPU the float16 memmap is read block by block in float32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UserError
from .common import Ranges, SearchResult, check_k, range_arrays


class TorchExactSearcher:
    """Exact top-k over float16 embeddings [n, dim] (a memmap is fine) by inner product."""

    def __init__(self, emb: np.ndarray, device: str | None = None, block: int = 1 << 18, use_kernel: bool = True):
        import torch

        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {device}: CUDA is not available here")
        self.torch = torch
        self.device = str(device)
        self.emb = emb
        self.n, self.dim = emb.shape
        self.block = int(block)
        self.use_kernel = use_kernel
        self.db = None
        if self.device.startswith("cuda"):
            self.db = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float16)).to(self.device)

    @property
    def ntotal(self) -> int:
        return self.n

    def _blocks(self, m: int):
        torch = self.torch
        block = max(1024, min(self.block, (1 << 25) // max(1, m)))   # scores block <= 32M floats
        for lo in range(0, self.n, block):
            if self.db is not None:
                yield lo, self.db[lo: lo + block]
            else:
                yield lo, torch.from_numpy(np.asarray(self.emb[lo: lo + block], dtype=np.float32))

    def search(self, q: np.ndarray, k: int, exclude: Sequence[Ranges] | None = None) -> SearchResult:
        torch = self.torch
        q = np.asarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UserError(f"queries: expected shape [m, {self.dim}], got {list(q.shape)}")
        k = check_k(k, self.n)
        m = len(q)
        ranges = range_arrays(exclude, m)
        dtype = torch.float16 if self.db is not None else torch.float32
        qt = torch.from_numpy(q).to(self.device, dtype)
        if ranges is None and self.db is not None and self.use_kernel:
            try:
                from ...kernels.topk_scan import topk_scan
            except ImportError:
                topk_scan = None
            if topk_scan is not None:
                s, i = topk_scan(qt, self.db, k)
                return SearchResult(s.float().cpu().numpy(), i.long().cpu().numpy())
        if ranges is not None:
            lo_t = torch.from_numpy(ranges[0]).to(self.device)
            hi_t = torch.from_numpy(ranges[1]).to(self.device)
        best_s = torch.full((m, k), float("-inf"), device=self.device)
        best_i = torch.full((m, k), -1, dtype=torch.int64, device=self.device)
        for lo, x in self._blocks(m):
            s = (qt @ x.T).float()
            if ranges is not None:
                cols = torch.arange(lo, lo + len(x), device=self.device)
                mask = (cols[None, :] >= lo_t[:, :1]) & (cols[None, :] < hi_t[:, :1])
                for j in range(1, lo_t.shape[1]):
                    mask |= (cols[None, :] >= lo_t[:, j:j + 1]) & (cols[None, :] < hi_t[:, j:j + 1])
                s.masked_fill_(mask, float("-inf"))
            kk = min(k, s.shape[1])
            ts, ti = torch.topk(s, kk, dim=1)
            cand_s = torch.cat([best_s, ts], 1)
            cand_i = torch.cat([best_i, ti + lo], 1)
            top_s, pos = torch.topk(cand_s, k, dim=1)
            best_s, best_i = top_s, torch.gather(cand_i, 1, pos)
        best_i = torch.where(torch.isfinite(best_s), best_i, torch.full_like(best_i, -1))
        return SearchResult(best_s.cpu().numpy().astype(np.float32), best_i.cpu().numpy())
