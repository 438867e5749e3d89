"""The `ngram` stage of build-index: the token stream -> infini-gram v4 shards in IDX/ngram/.

The corpus is cut into shards of whole documents, each small enough that building it stays within the
memory budget (`--mem`, GiB). A shard is built in one process:

  1. tokenized.K: its documents, each prefixed by the separator; offset.K: where each one starts;
  2. table.K: libdivsufsort (pydivsufsort) sorts every suffix of tokenized.K's bytes; the suffixes that
     start on a token boundary are kept, in place, and written as ptr_size-byte pointers. Sorting bytes
     gives exactly infini-gram's order (it compares suffixes with memcmp on little-endian tokens).

Peak memory of a shard of B bytes is about 5 B (the bytes and a 4-byte suffix array entry per byte; 9 B
beyond 2 GiB, where entries are 8 bytes), plus the interpreter. Shards are built in parallel processes,
as many as there are cores and as the budget allows; the main process writes metadata.K/metaoff.K (one
JSON line per document from store.sqlite) meanwhile. Documents keep their order, so the global document
index of a shard's document is its id in store.sqlite.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..index.build import AppendContext, Stage, StageContext, StageOutput
from ..index.errors import IndexFormatError, UserError
from ..index.handle import Index
from ..index.store import open_store
from ..index.stages.tokenize import DOC_OFFSETS, TOKENS_BIN, default_workers
from ..index.tokenizer import TOKEN_DTYPES
from . import suffix_array
from .shards import NGRAM_DIR, pointer_size, separator, shard_ids

BASE_BYTES = 400 << 20          # interpreter, numpy, numba in each building process
PACK_CHUNK = 1 << 23            # suffix-array entries packed and written at a time
INT32_LIMIT = (1 << 31) - 1     # libdivsufsort's 32-bit entries index up to this many bytes


def default_mem_gib() -> float:
    """Half the machine's memory, at most 8 GiB."""
    import psutil

    return min(8.0, psutil.virtual_memory().total / 2 / 2**30)


def build_bytes_per_token(width: int, shard_bytes: int) -> int:
    """Peak bytes per token while building a shard: the tokenized bytes plus the suffix array of bytes."""
    entry = 4 if shard_bytes <= INT32_LIMIT else 8
    return width * (1 + entry)


@dataclass(frozen=True)
class ShardPlan:
    k: int
    doc_lo: int      # documents [doc_lo, doc_hi) of the token stream
    doc_hi: int
    tokens: int      # tokens in tokenized.K, separators included


def plan_shards(doc_offsets: np.ndarray, width: int, mem_bytes: int, workers: int,
                max_shard_tokens: int | None = None) -> tuple[list[ShardPlan], int]:
    """Cut the documents into shards that fit the budget; returns (shards, processes to run at once).

    With one process the whole budget goes to one shard at a time; with P processes each gets 1/P. P is
    the largest count up to `workers` for which the shards are still no fewer than the processes."""
    n_docs = len(doc_offsets) - 1
    total = int(doc_offsets[-1]) + n_docs
    usable = mem_bytes - BASE_BYTES
    if usable <= 0:
        raise UserError(f"--mem {mem_bytes / 2**30:g}: too small; the n-gram build needs at least "
                        f"{math.ceil(2 * BASE_BYTES / 2**30 * 10) / 10} GiB")

    def capacity(processes: int) -> int:   # tokens per shard when `processes` build at once
        per_process = (mem_bytes - processes * BASE_BYTES) // processes
        cap = per_process // build_bytes_per_token(width, 0)
        if cap * width > INT32_LIMIT:   # beyond 2 GiB the suffix array's entries take 8 bytes
            cap = max(INT32_LIMIT // width, per_process // build_bytes_per_token(width, INT32_LIMIT + 1))
        return int(cap)

    processes = 1
    for p in range(max(1, workers), 0, -1):
        if capacity(p) > 0 and math.ceil(total / capacity(p)) >= p:
            processes = p
            break
    cap = capacity(processes)
    if max_shard_tokens:
        cap = min(cap, int(max_shard_tokens))
    longest = int(np.max(np.diff(doc_offsets.astype(np.int64)))) + 1 if n_docs else 0
    if longest > cap:
        raise UserError(f"--mem {mem_bytes / 2**30:g}: a document of {longest:,} tokens does not fit one shard "
                        f"({cap:,} tokens at this budget); raise --mem")
    n_shards = max(processes, math.ceil(total / cap))
    # cut at document boundaries, aiming at equal shards
    target = math.ceil(total / n_shards)
    plans, lo, k = [], 0, 0
    starts = doc_offsets[:-1].astype(np.int64) + np.arange(n_docs, dtype=np.int64)   # with separators
    while lo < n_docs:
        base = int(starts[lo])
        hi = int(np.searchsorted(starts, base + target, side="left"))
        hi = max(hi, lo + 1)
        while hi > lo + 1 and (int(doc_offsets[hi]) + hi) - base > cap:
            hi -= 1
        plans.append(ShardPlan(k, lo, hi, (int(doc_offsets[hi]) + hi) - base))
        lo, k = hi, k + 1
    return plans, min(processes, len(plans))


def build_shard(index_dir: str, out_dir: str, plan: ShardPlan, width: int) -> dict:
    """Write tokenized.K, offset.K and table.K for one shard (runs in a worker process)."""
    t0 = time.perf_counter()
    dtype = TOKEN_DTYPES[width]
    offsets = np.fromfile(Path(index_dir) / DOC_OFFSETS, dtype=np.uint64)[plan.doc_lo:plan.doc_hi + 1].astype(np.int64)
    n_docs = plan.doc_hi - plan.doc_lo
    first, last = int(offsets[0]), int(offsets[-1])
    ds = np.empty(plan.tokens, dtype)
    seps = offsets[:-1] - first + np.arange(n_docs, dtype=np.int64)        # separator positions, in tokens
    body = np.ones(plan.tokens, bool)
    body[seps] = False
    ds[seps] = separator(width)
    ds[body] = np.fromfile(Path(index_dir) / TOKENS_BIN, dtype=dtype, count=last - first, offset=first * width)
    del body
    out = Path(out_dir)
    ds.tofile(out / f"tokenized.{plan.k}")
    (seps * width).astype(np.uint64).tofile(out / f"offset.{plan.k}")
    t1 = time.perf_counter()

    sort_seconds = write_table(out, plan.k, ds)
    t2 = t1 + sort_seconds
    t3 = time.perf_counter()
    return {"k": plan.k, "tokens": plan.tokens, "docs": n_docs, "ptr_size": pointer_size(plan.tokens * width),
            "seconds_write": t1 - t0, "seconds_sort": t2 - t1, "seconds_table": t3 - t2,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def write_table(out: Path, k: int, ds: np.ndarray) -> float:
    """table.K for the tokens ds (tokenized.K's content): sort the byte suffixes, keep the token-aligned
    ones in place, write them as ptr_size-byte pointers. Returns the seconds spent sorting."""
    from pydivsufsort import divsufsort

    width = ds.dtype.itemsize
    raw = ds.view(np.uint8)
    t0 = time.perf_counter()
    sa = divsufsort(raw)                        # int32 (int64 beyond 2 GiB) suffix array of the bytes
    seconds = time.perf_counter() - t0
    kept = suffix_array.keep_aligned(sa, width) if width > 1 else len(sa)
    if kept != len(ds):
        raise AssertionError(f"suffix array of {len(ds)} tokens kept {kept} aligned suffixes")
    ps = pointer_size(len(raw))
    buf = np.empty(min(PACK_CHUNK, max(kept, 1)) * ps, np.uint8)
    with open(Path(out) / f"table.{k}", "wb") as f:
        for a in range(0, kept, PACK_CHUNK):
            chunk = sa[a:min(kept, a + PACK_CHUNK)]
            suffix_array.pack_pointers(chunk, ps, buf)
            f.write(buf[:len(chunk) * ps].tobytes())
    return seconds


def write_shard(out: Path, k: int, docs: list[np.ndarray], width: int, metadata: list[str] | None = None) -> None:
    """A complete shard K from a list of documents' token ids (for tests and tools): tokenized.K, offset.K,
    table.K, and metadata.K/metaoff.K when `metadata` (one string per document, without newline) is given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = TOKEN_DTYPES[width]
    sep = separator(width)
    parts, offs, pos = [], [], 0
    for d in docs:
        d = np.asarray(d, dtype=np.int64)
        if len(d) and (d.min() < 0 or d.max() >= sep):
            raise ValueError(f"token ids must be in [0, {sep}) for u{8 * width} shards")
        parts += [np.array([sep], dtype), d.astype(dtype)]
        offs.append(pos * width)
        pos += 1 + len(d)
    ds = np.concatenate(parts)
    ds.tofile(out / f"tokenized.{k}")
    np.array(offs, np.uint64).tofile(out / f"offset.{k}")
    write_table(out, k, ds)
    if metadata is not None:
        lines = [(m + "\n").encode("utf-8") for m in metadata]
        np.concatenate([[0], np.cumsum([len(x) for x in lines])[:-1]]).astype(np.uint64).tofile(out / f"metaoff.{k}")
        (out / f"metadata.{k}").write_bytes(b"".join(lines))


def write_metadata(index_dir: Path, out_dir: Path, plans: list[ShardPlan]) -> None:
    """metadata.K / metaoff.K: one JSON line per document (its store row), and the lines' offsets."""
    db = open_store(index_dir)
    for plan in plans:
        offs = np.empty(plan.doc_hi - plan.doc_lo, np.uint64)
        pos = 0
        with open(out_dir / f"metadata.{plan.k}", "wb") as f:
            rows = db.query("SELECT id, source, external_id, metadata FROM documents WHERE id >= ? AND id < ? "
                            "ORDER BY id", [plan.doc_lo, plan.doc_hi])
            for i, r in enumerate(rows):
                line = json.dumps({"doc_id": r["id"], "source": r["source"], "external_id": r["external_id"],
                                   "metadata": json.loads(r["metadata"]) if r["metadata"] else {}},
                                  ensure_ascii=False).encode("utf-8") + b"\n"
                offs[i] = pos
                f.write(line)
                pos += len(line)
        offs.tofile(out_dir / f"metaoff.{plan.k}")
    db.conn.close()


def build_ngram_dir(index: Index | Path | str, out_dir: Path, mem_gib: float, workers: int, progress=None,
                    max_shard_tokens: int | None = None) -> dict:
    """Build every shard of an index's token stream into out_dir; returns the stage's counts."""
    index = Index.of(index)
    index_dir, stream = index.dir, index.tokens
    width = stream.tokens.dtype.itemsize
    plans, processes = plan_shards(stream.doc_offsets, width, int(mem_gib * 2**30), workers, max_shard_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(p.tokens for p in plans)
    t0 = time.perf_counter()
    results = []
    if processes == 1:
        import threading

        meta = threading.Thread(target=write_metadata, args=(index_dir, out_dir, plans))  # sorting releases the GIL
        meta.start()
        for plan in plans:
            results.append(build_shard(str(index_dir), str(out_dir), plan, width))
            if progress:
                progress(plan.tokens)
        meta.join()
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(build_shard, str(index_dir), str(out_dir), p, width) for p in plans]
            write_metadata(index_dir, out_dir, plans)
            for fut in futures:
                results.append(fut.result())
                if progress:
                    progress(results[-1]["tokens"])
    seconds = time.perf_counter() - t0
    peak = max([r["peak_rss_bytes"] for r in results] + [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])
    return {"shards": len(plans), "processes": processes, "tokens": total, "documents": stream.n_docs,
            "token_width": width, "seconds": seconds, "tokens_per_second": total / max(seconds, 1e-9),
            "peak_rss_bytes": peak, "shard_results": results}


def run_ngram(ctx: StageContext) -> StageOutput:
    mem = ctx.options.get("mem")
    mem = float(mem) if mem is not None else default_mem_gib()
    workers = int(ctx.options.get("workers") or default_workers())
    stream = ctx.index.tokens
    task = ctx.track("ngram suffix arrays", total=int(stream.doc_offsets[-1]) + stream.n_docs)
    info = build_ngram_dir(ctx.index, ctx.tmp_dir / NGRAM_DIR, mem, workers, progress=task.advance,
                           max_shard_tokens=ctx.options.get("ngram_shard_tokens"))
    return StageOutput(counts={"shards": info["shards"], "tokens": info["tokens"], "documents": info["documents"],
                               "peak_rss_mb": info["peak_rss_bytes"] >> 20})


def append_ngram(ctx: AppendContext) -> None:
    """`build-index --append`: the new documents become one new shard IDX/ngram/*.K (K = the next number),
    built as the stage builds each of its shards."""
    index_dir = ctx.index_dir
    k = max(shard_ids(index_dir / NGRAM_DIR), default=-1) + 1
    n_new = len(ctx.docs)
    n_tokens = int(ctx.doc_offsets[-1]) - ctx.token_lo
    tmp = index_dir / ".tmp-append-ngram"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        plan = ShardPlan(k, ctx.doc_lo, ctx.doc_lo + n_new, n_tokens + n_new)
        build_shard(str(index_dir), str(tmp), plan, ctx.index.token_width)
        write_metadata(index_dir, tmp, [plan])
        moved = []
        for f in sorted(tmp.iterdir()):
            rel = f"{NGRAM_DIR}/{f.name}"
            if (index_dir / rel).exists():
                raise IndexFormatError(f"{index_dir / rel}: already exists; cannot add n-gram shard {k}")
            ctx.journal.new_file(rel)
            os.replace(f, index_dir / rel)
            moved.append(rel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec = ctx.record("ngram")
    rec.counts["shards"] = int(rec.counts.get("shards", 0)) + 1
    rec.counts["tokens"] = int(rec.counts.get("tokens", 0)) + n_tokens + n_new
    rec.counts["documents"] = int(rec.counts.get("documents", 0)) + n_new
    ctx.refresh("ngram", moved)
    ctx.added["ngram_shard"] = k


# ngram_shard_tokens (no CLI flag): an upper bound on a shard's tokens, to exercise several shards in tests.
NGRAM = Stage("ngram", ("tokenize",), run_ngram, option_keys=("mem", "ngram_shard_tokens"),
              summary="token stream -> suffix arrays (infini-gram v4 shards)", append=append_ngram, order=20)
