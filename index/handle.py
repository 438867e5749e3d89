"""`Index`: one handle on an index directory, for everything that reads one.

    from retrogram.index import Index
    index = Index.open("IDX")        # manifest.json read and checked here, once
    index.tokens                     # TokenStream (memory-mapped token stream and document offsets)
    index.tokenizer, index.store     # the index's tokenizer; store.sqlite, read-only
    index.chunks                     # ChunkTable
    index.embeddings                 # float16 memmap [n_chunks, dim] (index.embeddings_config: its JSON)
    index.searcher()                 # the nearest-chunk searcher (search.open_searcher's arguments)

Each part is opened on first use and kept; a part whose stage was not built raises `IndexFormatError`
naming the stage and the command that builds it, and a file missing or of another size than the manifest
recorded is named as well (`require`, which checks a stage's files once per handle). `Engine`,
`Retriever`, the build stages and the servicers take an `Index` (or a path, which they open as one), so a
process that opens several of them reads the manifest once.

The handle is a snapshot: the manifest as it was when opened. A build or `--append` writes a new one;
open a new handle to see it.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from .manifest import Manifest, StageRecord


class Index:
    """An index directory with its manifest (see the module docstring)."""

    def __init__(self, index_dir: Path | str, manifest: Manifest):
        self.dir = Path(index_dir)
        self.manifest = manifest
        self._required: set[str] = set()
        self._searchers: dict[tuple, Any] = {}

    @classmethod
    def open(cls, index_dir: Path | str) -> "Index":
        """Read and check IDX/manifest.json (IndexFormatError naming the file when it is not an index)."""
        return cls(index_dir, Manifest.load(index_dir))

    @classmethod
    def of(cls, index: "Index | str | os.PathLike") -> "Index":
        """`index` itself, or the index directory it names opened."""
        return index if isinstance(index, Index) else cls.open(index)

    def __repr__(self) -> str:
        return f"Index({str(self.dir)!r}, stages={list(self.manifest.stages)})"

    # -- stages --------------------------------------------------------------------------------------
    def has(self, stage: str) -> bool:
        return stage in self.manifest.stages

    def require(self, stage: str) -> StageRecord:
        """The stage's record, after checking (once per handle) that its files have their recorded sizes."""
        if stage in self._required:
            return self.manifest.stages[stage]
        rec = self.manifest.require_stage(self.dir, stage)
        self._required.add(stage)
        return rec

    @property
    def token_width(self) -> int:
        return self.manifest.token_width

    @property
    def token_dtype(self):
        return self.manifest.token_dtype

    # -- parts, opened on first use ------------------------------------------------------------------
    @cached_property
    def tokens(self):
        """The token stream (`stages.tokenize.TokenStream`)."""
        from .stages.tokenize import TokenStream

        return TokenStream.from_index(self)

    @cached_property
    def tokenizer(self):
        """The tokenizer the index was built with, from its own copy (IDX/tokenizer/)."""
        from .tokenizer import load_index_tokenizer

        return load_index_tokenizer(self.dir, name=self.manifest.tokenizer.get("name"))

    @cached_property
    def store(self):
        """store.sqlite, read-only (a sqlite_utils.Database)."""
        from .store import open_store

        return open_store(self.dir)

    @cached_property
    def chunks(self):
        """The chunk table (`stages.chunks.ChunkTable`)."""
        from .stages.chunks import ChunkTable

        return ChunkTable.from_index(self)

    @cached_property
    def _embeddings(self):
        from .stages.embeddings import read_embeddings

        return read_embeddings(self)

    @property
    def embeddings(self):
        """The chunk embeddings: float16 memmap [n_chunks, dim], row i = chunk i."""
        return self._embeddings[0]

    @property
    def embeddings_config(self) -> dict:
        """IDX/retrieval/embeddings.json: {embedder, n, dim, dtype, normalized}."""
        return self._embeddings[1]

    @cached_property
    def embedder_info(self):
        """What the index records about its embedder (`embedder.EmbedderInfo`)."""
        from .embedder import EmbedderInfo

        return EmbedderInfo(**self.embeddings_config["embedder"])

    def searcher(self, backend: str = "auto", device: str | None = None, nprobe: int | None = None,
                 ef_search: int | None = None, rerank: int | None = None):
        """The nearest-chunk searcher (`search.open_searcher`), opened once per set of arguments."""
        key = (backend, device, nprobe, ef_search, rerank)
        if key not in self._searchers:
            from .search import open_searcher

            self._searchers[key] = open_searcher(self, backend, device=device, nprobe=nprobe,
                                                 ef_search=ef_search, rerank=rerank)
        return self._searchers[key]
