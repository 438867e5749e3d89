"""The `chunks` stage: every document cut into RETRO chunks of 64 tokens (never crossing documents).

IDX/chunks/chunks.bin   int64 [n_chunks, 4]: (global token offset, document id, token length, short flag)
store.sqlite `chunks`   (id, doc_id, token_offset, token_len, short): token_offset is within the document

Chunk ids follow document order, so a document's chunks are the contiguous id range
`first_chunk[d] .. first_chunk[d + 1]`. The last chunk of a document may be shorter than 64 tokens: it is
kept and marked `short = 1` (Megatron RETRO pads it; we keep the real length and let readers pad).
A neighbour is a chunk plus its continuation: the next `chunk_len` tokens of the same document.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..build import AppendContext, Stage, StageContext, StageOutput
from ..errors import IndexFormatError, UserError
from ..handle import Index
from ..store import open_store
from .tokenize import TokenStream

CHUNK_LEN = 64
CHUNKS_BIN = "chunks/chunks.bin"
CHUNK_COLS = 4  # offset, doc, len, short


def chunk_boundaries(doc_offsets: np.ndarray, chunk_len: int = CHUNK_LEN) -> np.ndarray:
    """int64 [n_chunks, 4] (global offset, doc id, length, short) for documents given by their offsets.

    Vectorised: document d of length L gets ceil(L / chunk_len) chunks; empty documents get none.
    """
    if not isinstance(chunk_len, (int, np.integer)) or chunk_len <= 0:
        raise UserError(f"chunk_len {chunk_len!r}: expected a positive number of tokens")
    off = np.asarray(doc_offsets, dtype=np.int64)
    lens = np.diff(off)
    n_per_doc = (lens + chunk_len - 1) // chunk_len
    n = int(n_per_doc.sum())
    doc = np.repeat(np.arange(len(lens), dtype=np.int64), n_per_doc)
    first = np.concatenate([[0], np.cumsum(n_per_doc)[:-1]]) if len(lens) else np.zeros(0, np.int64)
    k = np.arange(n, dtype=np.int64) - np.repeat(first, n_per_doc)       # chunk index within its document
    start = off[:-1][doc] + k * chunk_len
    end = np.minimum(start + chunk_len, off[1:][doc])
    out = np.empty((n, CHUNK_COLS), dtype=np.int64)
    out[:, 0] = start
    out[:, 1] = doc
    out[:, 2] = end - start
    out[:, 3] = (end - start) < chunk_len
    return out


@dataclass
class ChunkTable:
    """The chunk arrays of an index (memory-mapped) with the token stream they point into."""

    rows: np.ndarray          # int64 [n, 4]
    stream: TokenStream
    chunk_len: int
    first_chunk: np.ndarray   # int64 [n_docs + 1]: document d's chunks are first_chunk[d]:first_chunk[d+1]

    @classmethod
    def open(cls, index: Index | Path | str) -> "ChunkTable":
        return Index.of(index).chunks

    @classmethod
    def from_index(cls, index: Index) -> "ChunkTable":
        rec = index.require("chunks")
        stream = index.tokens
        path = index.dir / CHUNKS_BIN
        n = int(rec.counts["chunks"])
        if path.stat().st_size != n * CHUNK_COLS * 8:
            raise IndexFormatError(f"{path}: {path.stat().st_size} bytes, expected {n} chunks x {CHUNK_COLS * 8}")
        rows = np.memmap(path, dtype=np.int64, mode="r", shape=(n, CHUNK_COLS)) if n else np.zeros((0, CHUNK_COLS), np.int64)
        docs = np.asarray(rows[:, 1])
        first = np.searchsorted(docs, np.arange(stream.n_docs + 1), side="left").astype(np.int64)
        return cls(rows, stream, int(rec.counts.get("chunk_len", CHUNK_LEN)), first)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def doc_ids(self) -> np.ndarray:
        return np.asarray(self.rows[:, 1])

    def tokens(self, chunk_id: int) -> np.ndarray:
        off, _, n, _ = (int(x) for x in self.rows[chunk_id])
        return np.asarray(self.stream.tokens[off: off + n])

    def continuation(self, chunk_id: int) -> np.ndarray:
        """The `chunk_len` tokens after the chunk in its own document (fewer at the document's end)."""
        off, doc, n, _ = (int(x) for x in self.rows[chunk_id])
        doc_end = int(self.stream.doc_offsets[doc + 1])
        return np.asarray(self.stream.tokens[off + n: min(off + n + self.chunk_len, doc_end)])

    def doc_range(self, doc_id: int) -> tuple[int, int]:
        return int(self.first_chunk[doc_id]), int(self.first_chunk[doc_id + 1])


def run_chunks(ctx: StageContext) -> StageOutput:
    chunk_len = int(ctx.options.get("chunk_len") or CHUNK_LEN)
    if chunk_len <= 0:
        raise UserError(f"--chunk-len {chunk_len}: expected a positive number of tokens")
    stream = ctx.index.tokens
    rows = chunk_boundaries(stream.doc_offsets, chunk_len)
    task = ctx.track("chunks", total=len(rows))
    (ctx.tmp_dir / "chunks").mkdir(parents=True, exist_ok=True)
    rows.tofile(ctx.tmp_dir / CHUNKS_BIN)
    write_chunk_table(ctx.index_dir, rows, stream.doc_offsets, start_id=0, replace=True, task=task)
    return StageOutput(counts={"chunks": len(rows), "short_chunks": int(rows[:, 3].sum()), "chunk_len": chunk_len},
                       tables={"chunks": len(rows)})


def write_chunk_table(index_dir: Path, rows: np.ndarray, doc_offsets: np.ndarray, start_id: int,
                      replace: bool, task=None) -> None:
    """Write chunk rows to store.sqlite's `chunks` table in one transaction (replace: drop the old table)."""
    db = open_store(index_dir, readonly=False)
    doc_start = np.asarray(doc_offsets, dtype=np.int64)
    with db.conn:
        if replace and "chunks" in db.table_names():
            db["chunks"].drop()
        if "chunks" not in db.table_names():
            db["chunks"].create({"id": int, "doc_id": int, "token_offset": int, "token_len": int, "short": int},
                                pk="id", not_null={"doc_id", "token_offset", "token_len", "short"})
        step = 50_000
        for lo in range(0, len(rows), step):
            part = rows[lo: lo + step]
            local = part[:, 0] - doc_start[part[:, 1]]
            db.conn.executemany(
                "INSERT INTO chunks (id, doc_id, token_offset, token_len, short) VALUES (?, ?, ?, ?, ?)",
                zip(range(start_id + lo, start_id + lo + len(part)), part[:, 1].tolist(), local.tolist(),
                    part[:, 2].tolist(), part[:, 3].tolist()))
            if task is not None:
                task.advance(len(part))
        if replace:
            db.conn.execute("CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id)")
    db.close()


def check_append_chunks(ctx: AppendContext) -> None:
    """--append keeps the index's chunk length."""
    built = int(ctx.record("chunks").counts.get("chunk_len", CHUNK_LEN))
    if ctx.options.get("chunk_len") and int(ctx.options["chunk_len"]) != built:
        raise UserError(f"--chunk-len {ctx.options['chunk_len']}: the index was chunked with {built}; "
                        "--append keeps its chunk length")


def append_chunks(ctx: AppendContext) -> None:
    """The new documents cut into chunks, appended to chunks.bin and the chunks table (ids continue)."""
    rec = ctx.record("chunks")
    chunk_len = int(rec.counts.get("chunk_len", CHUNK_LEN))
    n_chunks = int(rec.counts["chunks"])
    rows = chunk_boundaries(ctx.doc_offsets[ctx.doc_lo:].astype(np.int64), chunk_len)
    rows[:, 1] += ctx.doc_lo
    with open(ctx.index_dir / CHUNKS_BIN, "ab") as f:
        f.write(rows.astype(np.int64).tobytes())
    write_chunk_table(ctx.index_dir, rows, ctx.doc_offsets, start_id=n_chunks, replace=False)
    rec.counts["chunks"] = n_chunks + len(rows)
    rec.counts["short_chunks"] = int(rec.counts.get("short_chunks", 0)) + int(rows[:, 3].sum())
    rec.tables["chunks"] = n_chunks + len(rows)
    ctx.refresh("chunks", [CHUNKS_BIN])
    ctx.chunk_lo, ctx.chunk_rows = n_chunks, rows
    ctx.added["chunks"] = len(rows)


CHUNKS = Stage("chunks", ("tokenize",), run_chunks, option_keys=("chunk_len",),
               summary="documents -> 64-token chunks (chunk table)", append=append_chunks,
               check_append=check_append_chunks, order=30)
