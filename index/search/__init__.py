"""Nearest-chunk search over an index's chunk embeddings: one package for every searcher, one way to open them.

- `FaissSearcher` (faiss.py): the `faiss` stage's index (exact, HNSW or IVF; shortlists re-ranked exactly),
  on the GPU when faiss-gpu is installed;
- `TorchExactSearcher` (torch_exact.py): exact search in torch (the fused Triton scan + top-k on CUDA);
- `TorchIVFSearcher` (torch_ivf.py): the FAISS IVF index's lists searched in torch, vectors streamed
  from host memory, for indexes larger than GPU memory.

Each has `search(q float32 [m, dim], k, exclude=None) -> SearchResult` and `ntotal`; `exact_search`
(common.py) is the brute-force numpy reference they are tested against. `open_searcher` picks and opens one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .common import Ranges, SearchResult, check_k, exact_search

if TYPE_CHECKING:
    from ..handle import Index

BACKENDS = ("auto", "faiss", "torch", "torch-ivf")

__all__ = ["BACKENDS", "Ranges", "SearchResult", "check_k", "exact_search", "open_searcher"]


def open_searcher(index: "Index | str | os.PathLike", backend: str = "auto", device: str | None = None, nprobe: int | None = None,
                  ef_search: int | None = None, rerank: int | None = None):
    """The searcher over an index built through the `faiss` stage.

    backend: 'faiss' (FAISS index, faiss-gpu when installed), 'torch' (exact search in torch, on CUDA when
    available), 'torch-ivf' (the FAISS IVF index's lists searched in torch, vectors streamed from host
    memory: `TorchIVFSearcher`) or 'auto' (on CUDA when faiss has no GPU: torch for exact indexes,
    torch-ivf for IVF ones; else faiss). nprobe / ef_search / rerank override faiss.json's."""
    from ..errors import UserError
    from ..handle import Index
    from .faiss import FaissSearcher

    if backend not in BACKENDS:
        raise UserError(f"backend {backend!r}: expected auto, faiss, torch or torch-ivf")
    index = Index.of(index)
    searcher = FaissSearcher.open(index, nprobe=nprobe, ef_search=ef_search, rerank=rerank)
    device = device if device not in (None, "auto") else None
    if backend == "torch" or (backend == "auto" and searcher.exact and not searcher.on_gpu and _cuda()):
        from .torch_exact import TorchExactSearcher

        return TorchExactSearcher(searcher.emb, device=device)
    if backend == "torch-ivf" or (backend == "auto" and not searcher.on_gpu and _cuda() and _plain_ivf(searcher)):
        from .torch_ivf import TorchIVFSearcher

        if not _plain_ivf(searcher):
            raise UserError("backend torch-ivf: the FAISS index is not an IVF index without a pre-transform")
        return TorchIVFSearcher.from_faiss(searcher.index, searcher.emb, nprobe=searcher.nprobe, device=device)
    return searcher


def _plain_ivf(searcher) -> bool:
    """An IVF FAISS index (any codes) without a pre-transform: what TorchIVFSearcher reads."""
    import faiss

    index = searcher.index
    return (not isinstance(faiss.downcast_index(index), faiss.IndexPreTransform)
            and faiss.try_extract_index_ivf(index) is not None)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
