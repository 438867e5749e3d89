"""The `tokenize` stage: corpus -> token stream (IDX/tokens/) + documents table (IDX/store.sqlite).

IDX/tokens/tokens.bin        every document's token ids, concatenated, u8/u16/u32 (manifest token_width)
IDX/tokens/doc_offsets.bin   u64 [n_docs + 1]: document i is tokens[off[i]:off[i+1]]; its id in the store is i

Documents are read by the main process (streamed) and tokenized in worker processes in batches, with a
bounded number of batches in flight so memory does not grow with the corpus.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .build import Stage, StageContext, StageOutput
from .corpus import IngestStats, iter_documents
from .errors import IndexFormatError, UserError
from .manifest import Manifest
from .store import STORE, create_store, insert_documents

TOKENS_BIN = "tokens/tokens.bin"
DOC_OFFSETS = "tokens/doc_offsets.bin"
BATCH_CHARS = 1 << 20      # ~1 MB of text per worker task
BATCH_DOCS = 4096


@dataclass
class TokenStream:
    """Read-only view of an index's token stream (memory-mapped)."""

    tokens: np.ndarray        # [n_tokens] u8/u16/u32
    doc_offsets: np.ndarray   # [n_docs + 1] u64

    @classmethod
    def open(cls, index_dir: Path | str) -> "TokenStream":
        index_dir = Path(index_dir)
        manifest = Manifest.load(index_dir)
        manifest.require_stage(index_dir, "tokenize")
        dtype = manifest.token_dtype
        offsets = np.fromfile(index_dir / DOC_OFFSETS, dtype=np.uint64)
        size = (index_dir / TOKENS_BIN).stat().st_size
        if len(offsets) == 0 or int(offsets[-1]) * np.dtype(dtype).itemsize != size:
            raise IndexFormatError(f"{index_dir / TOKENS_BIN}: size {size} does not match {index_dir / DOC_OFFSETS}")
        tokens = np.memmap(index_dir / TOKENS_BIN, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        return cls(tokens, offsets)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[int(self.doc_offsets[i]): int(self.doc_offsets[i + 1])]


# -- worker side ---------------------------------------------------------------------------------------
_worker_tok = None


def _init_worker(tok_dir: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one process per core already
    from .tokenizer import load_index_tokenizer

    _worker_tok = load_index_tokenizer(Path(tok_dir).parent)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (lengths [n] i64, ids [sum(lengths)] i64): two arrays pickle far faster than n lists."""
    arrays = _worker_tok.encode_batch(texts)
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    return lengths, ids


def _batches(docs, stats: IngestStats):
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_tokenize(ctx: StageContext) -> StageOutput:
    dtype = ctx.manifest.token_dtype
    sep = np.iinfo(dtype).max
    workers = int(ctx.options.get("workers") or default_workers())
    (ctx.tmp_dir / "tokens").mkdir(parents=True, exist_ok=True)
    stats = IngestStats()
    total_bytes = sum(f.stat().st_size for f in ctx.corpus_files)
    task = ctx.track("tokenize", total=total_bytes)
    db = create_store(ctx.tmp_dir / STORE)
    n_docs = n_tokens = 0
    last_bytes = 0
    with open(ctx.tmp_dir / TOKENS_BIN, "wb") as tok_f, open(ctx.tmp_dir / DOC_OFFSETS, "wb") as off_f:
        off_f.write(np.zeros(1, np.uint64).tobytes())

        def write(batch, lengths: np.ndarray, ids: np.ndarray) -> None:
            nonlocal n_docs, n_tokens, last_bytes
            if len(ids) and (int(ids.max()) >= sep or int(ids.min()) < 0):
                raise UserError(f"tokenizer {ctx.tokenizer.name}: produced id {int(ids.max())}, "
                                f"which collides with the separator {sep} of a u{8 * np.dtype(dtype).itemsize} stream")
            tok_f.write(ids.astype(dtype).tobytes())
            offsets = n_tokens + np.cumsum(lengths, dtype=np.uint64)
            off_f.write(offsets.astype(np.uint64).tobytes())
            rows = []
            start = n_tokens
            for i, (doc, n) in enumerate(zip(batch, lengths.tolist())):
                rows.append({"id": n_docs + i, "source": doc.source, "external_id": doc.external_id,
                             "token_offset": start, "token_len": n,
                             "metadata": json.dumps(doc.metadata, ensure_ascii=False) if doc.metadata else None})
                start += n
            insert_documents(db, rows)
            n_docs += len(batch)
            n_tokens += int(lengths.sum())
            task.advance(stats.bytes_read - last_bytes)
            last_bytes = stats.bytes_read

        batches = _batches(iter_documents(ctx.corpus_files, stats), stats)
        if workers <= 1:
            _init_worker(str(ctx.index_dir / "tokenizer"))
            for batch in batches:
                write(batch, *_encode_batch([d.text for d in batch]))
        else:
            with mp.get_context("spawn").Pool(workers, _init_worker, (str(ctx.index_dir / "tokenizer"),)) as pool:
                in_flight: deque = deque()
                for batch in batches:
                    in_flight.append((batch, pool.apply_async(_encode_batch, ([d.text for d in batch],))))
                    if len(in_flight) >= 2 * workers:
                        b, r = in_flight.popleft()
                        write(b, *r.get())
                while in_flight:
                    b, r = in_flight.popleft()
                    write(b, *r.get())
    db.conn.commit()
    db.close()
    if n_docs == 0:
        raise UserError(f"--corpus: no documents found in {len(ctx.corpus_files)} file(s) "
                        f"({stats.skipped_empty} empty documents skipped)")
    return StageOutput(counts={"documents": n_docs, "tokens": n_tokens, "files": stats.files,
                               "skipped_empty": stats.skipped_empty, "bytes": stats.bytes_read},
                       tables={"documents": n_docs})


TOKENIZE = Stage("tokenize", (), run_tokenize, option_keys=(),
                 summary="corpus -> token stream and document store")
