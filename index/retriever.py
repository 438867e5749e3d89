"""`Retriever`: RETRO neighbours (chunk + continuation) of queries given as text, token ids or embeddings.

    from retrogram.index import Retriever
    r = Retriever.open("IDX")                         # faiss.index + embeddings + chunk table + store
    [[n1, n2]] = r.search("who killed Duncan?", k=2)  # one list of Neighbour per query
    n1.score, n1.chunk_id, n1.doc_id, n1.text, n1.continuation_text, n1.document["metadata"]
    r.search(["q1", "q2"], k=4, exclude_doc=[3, None]) # per-query own-document exclusion
    r.search_tokens([[101, 2054, ...]], k=2)          # token ids of the index's tokenizer
    r.search_embeddings(np.ndarray[m, 384], k=2)
    r.search_ids(emb, k) -> SearchResult(scores [m, k], ids [m, k])   # no materialisation (fast path)

Every result is a `Neighbour` (a dataclass; `.to_dict()` gives plain JSON types, which is what the gRPC
RetrieverService sends). Bad arguments raise `UserError` with the argument named.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .embedder import Embedder, resolve_embedder_dir
from .errors import IndexFormatError, UserError
from .handle import Index
from .search import BACKENDS, Ranges, SearchResult, check_k
from .search.faiss import FaissSearcher


@dataclass
class Neighbour:
    """One retrieved chunk.

    score: inner product with the query (cosine: embeddings are unit norm); chunk_id: row in `chunks`;
    doc_id: its document; token_offset: the chunk's first token within the document;
    tokens / continuation: token ids of the chunk and of the next chunk_len tokens of the same document
    (RETRO's neighbour = tokens + continuation); text / continuation_text: their decoded text;
    document: {"source", "external_id", "metadata"} of the document.
    """

    score: float
    chunk_id: int
    doc_id: int
    token_offset: int
    tokens: list[int]
    continuation: list[int]
    text: str
    continuation_text: str
    document: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise UserError(f"{name} {v!r}: expected an integer")
    return int(v)


# What a query's scores promise: the same query scores the same, alone or inside any batch, to within
# SCORE_ATOL (cosine / inner product). Batches pad queries to their longest, which changes the order of the
# encoder's floating-point sums (the 7th-8th digit on CPU); neighbours are the same and in the same order
# unless two of their scores lie within SCORE_ATOL of each other.
SCORE_ATOL = 1e-5


def same_neighbours(a: list[dict], b: list[dict], atol: float = SCORE_ATOL) -> bool:
    """Whether two neighbour lists (`Neighbour.to_dict()` or the client's dicts) agree as SCORE_ATOL promises:
    every field equal except the scores, which may differ by atol."""
    return len(a) == len(b) and all(
        {**x, "score": 0.0} == {**y, "score": 0.0} and abs(x["score"] - y["score"]) <= atol for x, y in zip(a, b))


class Retriever:
    """Nearest-chunk search over one index directory (see the module docstring for the API)."""

    def __init__(self, index: Index, searcher, embedder_spec=None, device: str | None = None):
        self.index = index
        self.index_dir = index.dir
        self.table = index.chunks
        self.searcher = searcher
        self.emb = index.embeddings
        self.dim = self.emb.shape[1]
        self.embedder_info = index.embedder_info
        self._embedder_spec = embedder_spec
        self._embedder: Embedder | None = None
        self._device = device
        self._docs: dict[int, dict] = {}
        if embedder_spec is not None:
            self._check_embedder_spec(embedder_spec)

    @classmethod
    def open(cls, index: Index | Path | str, embedder: str | None = None, device: str | None = None,
             nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None,
             backend: str = "auto") -> "Retriever":
        """Load an index built through the `faiss` stage (an `Index`, or its directory).

        embedder: the query embedder (default: the index's; another one must be the same model).
        backend: 'faiss' (FAISS index, faiss-gpu when installed), 'torch' (exact search in torch, on
        CUDA when available), 'torch-ivf' (the FAISS IVF index's lists searched in torch, vectors streamed
        from host memory: `TorchIVFSearcher`) or 'auto' (on CUDA when faiss has no GPU: torch for exact
        indexes, torch-ivf for IVF ones; else faiss). See `search.open_searcher`.
        """
        if backend not in BACKENDS:
            raise UserError(f"backend {backend!r}: expected auto, faiss, torch or torch-ivf")
        index = Index.of(index)
        index.require("faiss")
        table = index.chunks
        searcher = index.searcher(backend, device=device, nprobe=nprobe, ef_search=ef_search, rerank=rerank)
        if len(table) != searcher.ntotal:
            raise IndexFormatError(f"{index.dir}/retrieval/faiss.index: {searcher.ntotal} vectors for "
                                   f"{len(table)} chunks; rebuild with --stages faiss --force")
        return cls(index, searcher, embedder, device)

    # -- embedder --------------------------------------------------------------------------------------
    def _check_embedder_spec(self, spec) -> None:
        from .embedder import _weights_digest

        name, path = resolve_embedder_dir(spec)
        if _weights_digest(path) != self.embedder_info.digest:
            raise UserError(f"--embedder {spec}: the index {self.index_dir} was embedded with "
                            f"{self.embedder_info.name!r} (another model); query with that embedder or rebuild "
                            "the embeddings stage")

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            spec = self._embedder_spec if self._embedder_spec is not None else self._index_embedder_spec()
            emb = Embedder.load(spec, device=self._device)
            if emb.info.digest != self.embedder_info.digest or emb.dim != self.dim:
                raise UserError(f"embedder {emb.info.name!r}: not the model the index was embedded with "
                                f"({self.embedder_info.name!r}, dim {self.dim})")
            self._embedder = emb
        return self._embedder

    def _index_embedder_spec(self):
        from .embedder import DEFAULT_EMBEDDER

        if self.embedder_info.name == DEFAULT_EMBEDDER:
            return None
        raise UserError(f"{self.index_dir}: embedded with the local model {self.embedder_info.name!r}; "
                        "pass its directory as embedder= (--embedder DIR)")

    @property
    def tokenizer(self):
        return self.index.tokenizer

    @property
    def n_chunks(self) -> int:
        return len(self.table)

    # -- queries ---------------------------------------------------------------------------------------
    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise UserError("queries: expected at least one query text")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UserError(f"queries[{i}]: expected a string, got {type(t).__name__}")
            if not t.strip():
                raise UserError(f"queries[{i}]: empty text")
        return self.embedder.encode(texts)

    def search(self, queries: str | Sequence[str], k: int = 2, exclude_doc=None,
               exclude_docs: Iterable[int] | None = None) -> list[list[Neighbour]]:
        """Neighbours of each query text: a list (one per query) of up to k `Neighbour`s, best first.

        exclude_doc: a document id left out of every query's results, or a sequence with one id (or None)
        per query; exclude_docs: document ids left out of every query's results."""
        return self.search_embeddings(self.embed(queries), k, exclude_doc, exclude_docs)

    def search_tokens(self, token_ids, k: int = 2, exclude_doc=None,
                      exclude_docs: Iterable[int] | None = None) -> list[list[Neighbour]]:
        """Like `search`, for token ids of the index's tokenizer: one sequence or a list of sequences."""
        seqs = token_ids
        if isinstance(seqs, np.ndarray):
            seqs = [seqs] if seqs.ndim == 1 else list(seqs)
        elif len(seqs) and not isinstance(seqs[0], (list, tuple, np.ndarray)):
            seqs = [seqs]
        if not len(seqs):
            raise UserError("token_ids: expected at least one sequence")
        vocab = self.tokenizer.vocab_size
        texts = []
        for i, s in enumerate(seqs):
            arr = np.asarray(s)
            if arr.size == 0:
                raise UserError(f"token_ids[{i}]: empty sequence")
            if arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) >= vocab:
                raise UserError(f"token_ids[{i}]: expected integer ids in [0, {vocab})")
            texts.append(self.tokenizer.decode(arr.tolist()))
        return self.search(texts, k, exclude_doc, exclude_docs)

    def search_embeddings(self, emb: np.ndarray, k: int = 2, exclude_doc=None,
                          exclude_docs: Iterable[int] | None = None) -> list[list[Neighbour]]:
        """Like `search`, for query embeddings float [m, dim] (or [dim]) from the index's embedder."""
        res = self.search_ids(emb, k, exclude_doc, exclude_docs)
        return [[self.neighbour(int(i), float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(res.scores, res.ids)]

    def search_ids(self, emb: np.ndarray, k: int = 2, exclude_doc=None,
                   exclude_docs: Iterable[int] | None = None) -> SearchResult:
        """Scores and chunk ids only: SearchResult(scores float32 [m, k], ids int64 [m, k]; -1 = none)."""
        q = np.asarray(emb)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim or q.dtype.kind != "f":
            raise UserError(f"embeddings: expected floats of shape [m, {self.dim}] (the index's embedder dim), "
                            f"got {q.dtype} {list(q.shape)}")
        if len(q) == 0:
            raise UserError("embeddings: expected at least one query")
        if not np.isfinite(q).all():
            raise UserError("embeddings: contain NaN or infinity")
        k = check_k(k, self.n_chunks)
        return self.searcher.search(q.astype(np.float32), k, self._exclusions(len(q), exclude_doc, exclude_docs))

    def _exclusions(self, m: int, exclude_doc, exclude_docs) -> list[Ranges] | None:
        n_docs = len(self.table.first_chunk) - 1
        common: list[int] = []
        if exclude_docs is not None:
            if isinstance(exclude_docs, (int, np.integer, str)):
                raise UserError(f"exclude_docs {exclude_docs!r}: expected a list of document ids")
            common = [_as_int("exclude_docs[]", d) for d in exclude_docs]
        per: list[list[int]] = [[] for _ in range(m)]
        if exclude_doc is not None:
            if isinstance(exclude_doc, (int, np.integer)) and not isinstance(exclude_doc, bool):
                per = [[int(exclude_doc)] for _ in range(m)]
            else:
                ex = list(exclude_doc)
                if len(ex) != m:
                    raise UserError(f"exclude_doc: {len(ex)} entries for {m} queries (give one id or None per query)")
                per = [[] if d is None else [_as_int("exclude_doc[]", d)] for d in ex]
        if not common and not any(per):
            return None
        out = []
        for docs in per:
            ranges = []
            for d in sorted(set(docs + common)):
                if not 0 <= d < n_docs:
                    raise UserError(f"exclude_doc {d}: no such document (the index has {n_docs})")
                lo, hi = self.table.doc_range(d)
                if lo < hi:
                    ranges.append((lo, hi))
            out.append(tuple(ranges))
        return out

    # -- results ---------------------------------------------------------------------------------------
    def document(self, doc_id: int) -> dict[str, Any]:
        if doc_id not in self._docs:
            rows = list(self.index.store.query("SELECT source, external_id, metadata FROM documents WHERE id = ?", [doc_id]))
            row = rows[0] if rows else {"source": None, "external_id": None, "metadata": None}
            row["metadata"] = json.loads(row["metadata"]) if row["metadata"] else {}
            self._docs[doc_id] = row
        return self._docs[doc_id]

    def neighbour(self, chunk_id: int, score: float = float("nan")) -> Neighbour:
        """A chunk as a Neighbour (tokens, continuation, text, document)."""
        chunk_id = _as_int("chunk_id", chunk_id)
        if not 0 <= chunk_id < self.n_chunks:
            raise UserError(f"chunk_id {chunk_id}: no such chunk (the index has {self.n_chunks})")
        off, doc, n, _ = (int(x) for x in self.table.rows[chunk_id])
        toks = self.table.tokens(chunk_id).tolist()
        cont = self.table.continuation(chunk_id).tolist()
        doc_start = int(self.table.stream.doc_offsets[doc])
        return Neighbour(score=float(score), chunk_id=chunk_id, doc_id=doc, token_offset=off - doc_start,
                         tokens=toks, continuation=cont, text=self.tokenizer.decode(toks),
                         continuation_text=self.tokenizer.decode(cont) if cont else "",
                         document=self.document(doc))

    # -- RETRO training data ---------------------------------------------------------------------------
    def precompute_neighbours(self, out: Path | str, k: int = 2, batch: int = 4096, progress=None) -> dict:
        """The k neighbours of every chunk, its own document excluded, saved to `out`: a .npz holds
        ids int64 [n, k] and scores float32 [n, k], a .npy the ids alone (-1 / -inf where fewer exist).
        Written to a temp name and renamed."""
        import os

        k = check_k(k, self.n_chunks)
        batch = _as_int("batch", batch)
        if batch <= 0:
            raise UserError(f"batch {batch}: expected a positive number of chunks")
        out = Path(out)
        if out.suffix not in (".npz", ".npy"):
            raise UserError(f"--out {out}: expected a .npz (ids and scores) or .npy (ids) file name")
        n = self.n_chunks
        ids = np.full((n, k), -1, dtype=np.int64)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        docs = self.table.doc_ids
        searcher = self.searcher
        if isinstance(searcher, FaissSearcher) and searcher.exact:   # vectorised own-document masking
            from .search.torch_exact import TorchExactSearcher

            searcher = TorchExactSearcher(self.emb, device="cpu")
        task_id = progress.add_task("neighbours", total=n) if progress is not None else None
        for lo in range(0, n, batch):
            hi = min(n, lo + batch)
            q = np.asarray(self.emb[lo:hi], dtype=np.float32)
            excl = [(self.table.doc_range(int(d)),) for d in docs[lo:hi]]
            res = searcher.search(q, k, excl)
            ids[lo:hi], scores[lo:hi] = res.ids, res.scores
            if progress is not None:
                progress.advance(task_id, hi - lo)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp" + out.suffix)
        if out.suffix == ".npz":
            np.savez(tmp, ids=ids, scores=scores)
        else:
            np.save(tmp, ids)
        os.replace(tmp, out)
        return {"out": str(out), "chunks": n, "k": k, "missing": int((ids < 0).sum())}
