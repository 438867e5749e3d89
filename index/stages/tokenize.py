"""The `tokenize` stage: corpus -> token stream (IDX/tokens/) + documents table (IDX/store.sqlite).

IDX/tokens/tokens.bin        every document's token ids, concatenated, u8/u16/u32 (manifest token_width)
IDX/tokens/doc_offsets.bin   u64 [n_docs + 1]: document i is tokens[off[i]:off[i+1]]; its id in the store is i

Documents are read by the main process (streamed) and tokenized in worker processes in batches, with a
bounded number of batches in flight so memory does not grow with the corpus.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..build import AppendContext, Stage, StageContext, StageOutput
from ..corpus import IngestStats, RawBatch, iter_raw_batches, parse_batch
from ..errors import IndexFormatError, UserError
from ..handle import Index
from ..store import STORE, create_store, insert_documents, metadata_json, open_store

TOKENS_BIN = "tokens/tokens.bin"
DOC_OFFSETS = "tokens/doc_offsets.bin"


@dataclass
class TokenStream:
    """Read-only view of an index's token stream (memory-mapped)."""

    tokens: np.ndarray        # [n_tokens] u8/u16/u32
    doc_offsets: np.ndarray   # [n_docs + 1] u64

    @classmethod
    def open(cls, index: Index | Path | str) -> "TokenStream":
        return Index.of(index).tokens

    @classmethod
    def from_index(cls, index: Index) -> "TokenStream":
        index.require("tokenize")
        index_dir = index.dir
        dtype = index.token_dtype
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


# -- worker side: parse a raw batch and tokenize it ----------------------------------------------------
_worker_tok = None


def _init_worker(index_dir: str, name: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one process per core already
    from ..tokenizer import load_index_tokenizer

    _worker_tok = load_index_tokenizer(index_dir, name)


@dataclass
class EncodedBatch:
    lengths: np.ndarray        # [n_docs] i64
    ids: np.ndarray            # [sum(lengths)] i64: two arrays pickle far faster than n lists
    rows: list[tuple]          # (source, external_id, metadata JSON or None) per document
    skipped_empty: int


def _encode_raw(batch: RawBatch) -> EncodedBatch:
    docs, skipped = parse_batch(batch)
    arrays = _worker_tok.encode_batch([d.text for d in docs])
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    rows = [(d.source, d.external_id, metadata_json(d.metadata)) for d in docs]
    return EncodedBatch(lengths, ids, rows, skipped)


def check_fits_stream(ids: np.ndarray, dtype, who: str) -> None:
    """Token ids must lie below the stream's document separator (the largest value of its width)."""
    sep = int(np.iinfo(dtype).max)
    if len(ids) and (int(ids.max()) >= sep or int(ids.min()) < 0):
        raise UserError(f"{who}: produced id {int(ids.max())}, which collides with the document separator {sep} "
                        f"of a u{8 * np.dtype(dtype).itemsize} stream")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _encoded_batches(ctx: StageContext, stats: IngestStats, workers: int) -> Iterator[EncodedBatch]:
    """Encoded batches in corpus order; at most 2 x workers batches in flight, so memory stays bounded."""
    raw = iter_raw_batches(ctx.corpus_files, stats)
    init_args = (str(ctx.index_dir), ctx.manifest.tokenizer["name"])
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(_encode_raw, raw)
        return
    with mp.get_context("spawn").Pool(workers, _init_worker, init_args) as pool:
        in_flight: deque = deque()
        for batch in raw:
            in_flight.append(pool.apply_async(_encode_raw, (batch,)))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def run_tokenize(ctx: StageContext) -> StageOutput:
    dtype = ctx.manifest.token_dtype
    workers = int(ctx.options.get("workers") or default_workers())
    (ctx.tmp_dir / "tokens").mkdir(parents=True, exist_ok=True)
    stats = IngestStats()
    task = ctx.track("tokenize", total=sum(f.stat().st_size for f in ctx.corpus_files))
    db = create_store(ctx.tmp_dir / STORE)
    n_docs = n_tokens = skipped = reported = 0
    with open(ctx.tmp_dir / TOKENS_BIN, "wb") as tok_f, open(ctx.tmp_dir / DOC_OFFSETS, "wb") as off_f:
        off_f.write(np.zeros(1, np.uint64).tobytes())
        for enc in _encoded_batches(ctx, stats, workers):
            check_fits_stream(enc.ids, dtype, f"tokenizer {ctx.tokenizer.name}")
            tok_f.write(enc.ids.astype(dtype).tobytes())
            ends = n_tokens + np.cumsum(enc.lengths, dtype=np.uint64)
            off_f.write(ends.astype(np.uint64).tobytes())
            starts = (ends - enc.lengths.astype(np.uint64)).tolist()
            insert_documents(db, [(n_docs + i, src, ext, start, n, meta) for i, ((src, ext, meta), start, n)
                                  in enumerate(zip(enc.rows, starts, enc.lengths.tolist()))])
            n_docs += len(enc.rows)
            n_tokens += int(enc.lengths.sum())
            skipped += enc.skipped_empty
            task.advance(stats.bytes_read - reported)
            reported = stats.bytes_read
    db.conn.commit()
    db.close()
    if n_docs == 0:
        raise UserError(f"--corpus: no documents found in {len(ctx.corpus_files)} file(s) "
                        f"({skipped} empty documents skipped)")
    return StageOutput(counts={"documents": n_docs, "tokens": n_tokens, "files": stats.files,
                               "skipped_empty": skipped, "bytes": stats.bytes_read},
                       tables={"documents": n_docs})


def append_tokenize(ctx: AppendContext) -> None:
    """The new documents tokenized with the index's tokenizer, appended to the token stream and the
    documents table (ids continue)."""
    tok, dtype = ctx.index.tokenizer, ctx.index.token_dtype
    ids = tok.encode_batch([d.text for d in ctx.docs])
    for d, a in zip(ctx.docs, ids):
        check_fits_stream(a, dtype, d.source)
    index_dir = ctx.index_dir
    old_off = np.fromfile(index_dir / DOC_OFFSETS, dtype=np.uint64)
    n_docs, n_tokens = len(old_off) - 1, int(old_off[-1])
    lens = np.array([len(a) for a in ids], dtype=np.int64)
    new_off = n_tokens + np.cumsum(lens).astype(np.uint64)
    with open(index_dir / TOKENS_BIN, "ab") as f:
        for a in ids:
            f.write(np.asarray(a).astype(dtype).tobytes())
    with open(index_dir / DOC_OFFSETS, "ab") as f:
        f.write(new_off.tobytes())
    db = open_store(index_dir, readonly=False)
    starts = np.concatenate([[n_tokens], new_off[:-1].astype(np.int64)])
    with db.conn:
        insert_documents(db, [(n_docs + i, d.source, d.external_id, int(s), int(n), metadata_json(d.metadata))
                              for i, (d, s, n) in enumerate(zip(ctx.docs, starts, lens))])
    db.close()
    ctx.doc_lo, ctx.token_lo = n_docs, n_tokens
    ctx.doc_offsets = np.concatenate([old_off, new_off])
    rec = ctx.record("tokenize")
    rec.counts["documents"] = n_docs + len(ctx.docs)
    rec.counts["tokens"] = int(ctx.doc_offsets[-1])
    rec.tables["documents"] = n_docs + len(ctx.docs)
    ctx.refresh("tokenize", [TOKENS_BIN, DOC_OFFSETS])
    ctx.added.update(documents=len(ctx.docs), tokens=int(lens.sum()))


TOKENIZE = Stage("tokenize", (), run_tokenize, option_keys=(),
                 summary="corpus -> token stream and document store", append=append_tokenize, order=10)
