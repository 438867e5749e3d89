"""The `embeddings` stage: every chunk detokenized to text and embedded, into a float16 memmap.

IDX/retrieval/embeddings.f16    float16 [n_chunks, dim], row i = chunk i, unit norm
IDX/retrieval/embeddings.json   {embedder: EmbedderInfo, n, dim, dtype}

Resumable in the middle: batches (length-sorted, a deterministic plan) are written into a memmap kept in
IDX/retrieval/.partial-embeddings/ beside `params.json` (what made it) and `progress.json` (batches done,
written only after the memmap is flushed). A killed build rerun with the same parameters continues after
the last finished batch; other parameters start over. The partial folder is removed when the stage ends.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..build import AppendContext, Stage, StageContext, StageOutput
from ..embedder import Embedder, EmbedderInfo, _weights_digest, resolve_embedder_dir
from ..errors import IndexFormatError, UserError
from ..handle import Index
from ..manifest import write_json_atomic
from .chunks import CHUNK_LEN, ChunkTable
from .tokenize import TOKENS_BIN, TokenStream

EMBEDDINGS_BIN = "retrieval/embeddings.f16"
EMBEDDINGS_JSON = "retrieval/embeddings.json"
PARTIAL_DIR = "retrieval/.partial-embeddings"


def chunk_texts(index: Index | Path | str, table: ChunkTable, ids: np.ndarray | None = None) -> list[str]:
    """The chunks' text (decoded with the index's tokenizer), for `ids` or all chunks."""
    tok = Index.of(index).tokenizer
    ids = np.arange(len(table)) if ids is None else np.asarray(ids)
    seqs = [table.tokens(int(i)).tolist() for i in ids]
    backend = getattr(tok, "backend", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        out = []
        for lo in range(0, len(seqs), 20000):
            out += backend.decode_batch(seqs[lo: lo + 20000], skip_special_tokens=False)
        return out
    return [tok.decode(s) for s in seqs]


def load_embeddings(index: Index | Path | str) -> tuple[np.ndarray, dict]:
    """(float16 memmap [n, dim], config) of a built index; checks its size against the chunk count."""
    index = Index.of(index)
    return index.embeddings, index.embeddings_config


def read_embeddings(index: Index) -> tuple[np.ndarray, dict]:
    """What `Index.embeddings` serves: load_embeddings' work."""
    rec = index.require("embeddings")
    index_dir = index.dir
    cfg = json.loads((index_dir / EMBEDDINGS_JSON).read_text())
    n, dim = int(cfg["n"]), int(cfg["dim"])
    if n != int(rec.counts["chunks"]):
        raise IndexFormatError(f"{index_dir / EMBEDDINGS_JSON}: {n} rows, the stage recorded {rec.counts['chunks']}")
    path = index_dir / EMBEDDINGS_BIN
    if path.stat().st_size != n * dim * 2:
        raise IndexFormatError(f"{path}: {path.stat().st_size} bytes, expected {n} x {dim} float16")
    emb = np.memmap(path, dtype=np.float16, mode="r", shape=(n, dim)) if n else np.zeros((0, dim), np.float16)
    return emb, cfg


def _load_partial(partial: Path, params: dict, n: int, dim: int) -> tuple[np.memmap, int]:
    """The memmap to continue and the first batch still to do (0 when starting over)."""
    mm_path = partial / "embeddings.f16"
    try:
        same = json.loads((partial / "params.json").read_text()) == params
        done = int(json.loads((partial / "progress.json").read_text())["batches_done"]) if same else 0
        ok = same and mm_path.stat().st_size == n * dim * 2
    except (OSError, ValueError, KeyError):
        ok, done = False, 0
    if not ok:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        write_json_atomic(partial / "params.json", params)
        write_json_atomic(partial / "progress.json", {"batches_done": 0})
        done = 0
        with open(mm_path, "wb") as f:
            f.truncate(n * dim * 2)
    mm = np.memmap(mm_path, dtype=np.float16, mode="r+", shape=(n, dim)) if n else None
    return mm, done


def run_embeddings(ctx: StageContext) -> StageOutput:
    table = ctx.index.chunks
    n = len(table)
    if n == 0:
        raise UserError(f"{ctx.index_dir}: the index has no chunks to embed (all documents empty?)")
    embedder = Embedder.load(ctx.options.get("embedder"), device=ctx.options.get("device"),
                             batch_tokens=ctx.options.get("embed_batch_tokens"))
    texts = chunk_texts(ctx.index, table)
    chunks_rec = ctx.manifest.stages["chunks"]
    params = {"embedder": embedder.info.to_json(), "n": n, "batch_tokens": embedder.batch_tokens,
              "chunks": {k: v["sha256"] for k, v in chunks_rec.files.items()}, "cpu_bf16": embedder.cpu_bf16,
              "device": embedder.device.split(":")[0]}
    partial = ctx.index_dir / PARTIAL_DIR
    mm, start = _load_partial(partial, params, n, embedder.dim)
    task = ctx.track("embeddings", total=n)
    rows_done = 0
    n_batches = start
    for b, rows, vecs in embedder.iter_encode(texts, start_batch=start):
        mm[rows] = vecs.astype(np.float16)
        rows_done += len(rows)
        n_batches = b + 1
        task.advance(len(rows))
        mm.flush()   # the rows first, then the marker that counts them
        write_json_atomic(partial / "progress.json", {"batches_done": n_batches})
    mm.flush()
    write_json_atomic(partial / "progress.json", {"batches_done": n_batches})
    del mm
    out = ctx.tmp_dir / "retrieval"
    out.mkdir(parents=True, exist_ok=True)
    os.replace(partial / "embeddings.f16", out / "embeddings.f16")
    write_json_atomic(out / "embeddings.json", {"embedder": embedder.info.to_json(), "n": n, "dim": embedder.dim,
                                                 "dtype": "float16", "normalized": embedder.normalize})
    shutil.rmtree(partial, ignore_errors=True)
    return StageOutput(counts={"chunks": n, "dim": embedder.dim, "resumed_at_batch": start,
                               "embedded_now": rows_done})


def index_embedder_info(index: Index | Path | str) -> EmbedderInfo:
    return Index.of(index).embedder_info


def check_append_embeddings(ctx: AppendContext) -> None:
    """--append embeds with the index's embedder (another directory of the same model will do)."""
    spec = ctx.options.get("embedder") or ctx.record("embeddings").params.get("embedder")
    _, path = resolve_embedder_dir(spec)
    if _weights_digest(path) != ctx.index.embedder_info.digest:
        raise UserError(f"--embedder {spec}: the index was embedded with {ctx.index.embedder_info.name!r}; "
                        "--append must use the same model")
    ctx.prepared["embedder"] = spec


def append_embeddings(ctx: AppendContext) -> None:
    """The new chunks embedded and appended to embeddings.f16 (embeddings.json rewritten with the new count)."""
    rows = ctx.chunk_rows
    if rows is None or not len(rows):
        return
    embedder = Embedder.load(ctx.prepared["embedder"], device=ctx.options.get("device"),
                             batch_tokens=ctx.options.get("embed_batch_tokens"))
    index_dir = ctx.index_dir
    tokens = np.memmap(index_dir / TOKENS_BIN, dtype=ctx.index.token_dtype, mode="r")   # with the new documents
    chunk_len = int(ctx.record("chunks").counts.get("chunk_len", CHUNK_LEN))
    table = ChunkTable(rows, TokenStream(tokens, ctx.doc_offsets), chunk_len, np.zeros(0, np.int64))
    vecs = embedder.encode(chunk_texts(ctx.index, table)).astype(np.float16)   # the new chunks only
    with open(index_dir / EMBEDDINGS_BIN, "ab") as f:
        f.write(vecs.tobytes())
    cfg = json.loads((index_dir / EMBEDDINGS_JSON).read_text())
    ctx.journal.backup(EMBEDDINGS_JSON)
    cfg["n"] = ctx.chunk_lo + len(rows)
    write_json_atomic(index_dir / EMBEDDINGS_JSON, cfg)
    ctx.record("embeddings").counts["chunks"] = cfg["n"]
    ctx.refresh("embeddings", [EMBEDDINGS_BIN, EMBEDDINGS_JSON])
    ctx.vectors = vecs


EMBEDDINGS = Stage("embeddings", ("chunks",), run_embeddings, option_keys=("embedder",),
                   summary="chunks -> float16 sentence embeddings (resumable)", append=append_embeddings,
                   check_append=check_append_embeddings, order=40)
