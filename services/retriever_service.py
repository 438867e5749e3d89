"""RetrieverService: retrogram.index.Retriever over gRPC. Proto <-> retriever types only; request limits.

Each call runs on a worker thread (serving.Server): query embedding (torch) and FAISS search release the GIL.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..index.handle import Index
from ..protos import common_pb2 as cpb
from ..protos import retriever_pb2 as pb
from .serving import CallContext, IndexService, invalid, server_version, too_large

DEFAULT_K = 2
MAX_K = 1000
MAX_QUERIES = 4096                 # queries in one Retrieve
MAX_QUERY_TOKENS = 1 << 14         # tokens in one query (the embedder truncates long inputs anyway)
MAX_TEXT_CHARS = 1 << 17
MAX_EXCLUDE = 1 << 16


class RetrieverServicer(IndexService):
    name = "retriever"
    descriptor = pb.DESCRIPTOR.services_by_name["RetrieverService"]
    inline = {"Info": lambda req: True}

    def __init__(self, index: Index | Path | str, embedder: str | None = None, device: str | None = None):
        super().__init__(index)
        self.embedder = embedder
        self.device = device
        self.retriever = None
        self._info: cpb.IndexInfo | None = None

    def check(self) -> None:
        self.open_index("faiss")

    def load(self) -> None:
        from ..index.retriever import Retriever

        index = self.open_index("faiss")
        r = self.retriever = Retriever.open(index, embedder=self.embedder, device=self.device)
        r.embedder   # load the query embedder now: SERVING means queries by text are ready
        r.tokenizer
        r.search_ids(np.zeros((1, r.dim), np.float32) + 1.0 / np.sqrt(r.dim), 1)
        manifest = index.manifest
        tok = manifest.tokenizer
        self._info = cpb.IndexInfo(
            index_dir=str(self.index_dir), tokenizer=str(tok.get("name", "")), tokenizer_sha256=str(tok.get("sha256", "")),
            vocab_size=int(tok.get("vocab_size", 0)), token_width=int(tok.get("token_width", 0)),
            num_documents=int(len(r.table.first_chunk) - 1), num_tokens=int(manifest.stages["tokenize"].counts.get("tokens", 0)),
            num_shards=1, num_chunks=int(r.n_chunks), embedding_dim=int(r.dim),
            server_version=server_version())
        if tok.get("eos_token_id") is not None:
            self._info.eos_token_id = int(tok["eos_token_id"])

    def Info(self, request, ctx: CallContext):
        return self._info

    def Retrieve(self, request: pb.RetrieveRequest, ctx: CallContext):
        r = self.retriever
        n = len(request.queries)
        if n == 0:
            raise invalid("queries: expected at least one query")
        if n > MAX_QUERIES:
            raise too_large(f"queries: {n:,}; the limit is {MAX_QUERIES:,} per call")
        k = request.k or DEFAULT_K
        if k > MAX_K:
            raise too_large(f"k {k:,}: the limit is {MAX_K:,}")
        if len(request.exclude_docs) > MAX_EXCLUDE:
            raise too_large(f"exclude_docs: {len(request.exclude_docs):,} documents; the limit is {MAX_EXCLUDE:,}")
        exclude_docs = list(request.exclude_docs) or None

        # group the queries by kind (one embedding batch per kind), then put the answers back in order
        groups: dict[str, list[int]] = {"text": [], "ids": [], "embedding": []}
        for i, q in enumerate(request.queries):
            kind = q.WhichOneof("kind")
            if kind is None:
                raise invalid(f"queries[{i}]: empty; give text, ids or embedding")
            groups[kind].append(i)
        results: list = [None] * n
        for kind, idx in groups.items():
            if not idx:
                continue
            ctx.check()
            qs = [request.queries[i] for i in idx]
            excl = [q.exclude_doc if q.HasField("exclude_doc") else None for q in qs]
            excl = excl if any(e is not None for e in excl) else None
            if kind == "text":
                texts = []
                for i, q in zip(idx, qs):
                    if len(q.text) > MAX_TEXT_CHARS:
                        raise too_large(f"queries[{i}]: {len(q.text):,} characters; the limit is {MAX_TEXT_CHARS:,}")
                    texts.append(q.text)
                found = r.search(texts, k, exclude_doc=excl, exclude_docs=exclude_docs)
            elif kind == "ids":
                seqs = []
                for i, q in zip(idx, qs):
                    if len(q.ids.ids) > MAX_QUERY_TOKENS:
                        raise too_large(f"queries[{i}]: {len(q.ids.ids):,} tokens; the limit is {MAX_QUERY_TOKENS:,}")
                    seqs.append(list(q.ids.ids))
                found = r.search_tokens(seqs, k, exclude_doc=excl, exclude_docs=exclude_docs)
            else:
                dims = {len(q.embedding.values) for q in qs}
                if dims != {r.dim}:
                    bad = next(i for i, q in zip(idx, qs) if len(q.embedding.values) != r.dim)
                    raise invalid(f"queries[{bad}]: an embedding of {len(request.queries[bad].embedding.values)} "
                                  f"values; this index's embedder gives {r.dim}")
                emb = np.array([q.embedding.values for q in qs], dtype=np.float32)
                found = r.search_embeddings(emb, k, exclude_doc=excl, exclude_docs=exclude_docs)
            for i, ns in zip(idx, found):
                results[i] = ns
        out = pb.RetrieveResponse()
        for ns in results:
            out.results.add().neighbours.extend(_neighbour(nb, request.omit_text) for nb in ns)
        return out


def _neighbour(n, omit_text: bool) -> pb.Neighbour:
    d = n.document or {}
    md = d.get("metadata") or {}
    return pb.Neighbour(score=n.score, chunk_id=n.chunk_id, doc_id=n.doc_id, token_offset=n.token_offset,
                        tokens=n.tokens, continuation=n.continuation,
                        text="" if omit_text else n.text, continuation_text="" if omit_text else n.continuation_text,
                        document=pb.Document(source=d.get("source") or "", external_id=d.get("external_id") or "",
                                             metadata=md if isinstance(md, str) else json.dumps(md, ensure_ascii=False)))
