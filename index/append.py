"""`build-index --append`: add documents to a built index without a rebuild.

The new documents are tokenized with the index's tokenizer and appended to the token stream and the
documents table (ids continue), cut into chunks (appended to chunks.bin and the chunks table), embedded
with the index's embedder (appended to embeddings.f16) and added to the FAISS index (an IVF index keeps
its trained centroids); when the index has n-gram shards, the new documents become one new shard
IDX/ngram/*.K built by the n-gram stage's own `build_shard`. The manifest's records (file sizes and
checksums, counts, table rows) are updated, so a later `build-index` finds every stage up to date.

Failure safety: before touching anything, the original sizes of the appended files and a copy of the
manifest go to IDX/.append-journal.json; any error rolls every file, table and the manifest back, and a
journal left by a killed run is rolled back at the start of the next append (or by `rollback_append`).
Whole files that are replaced (faiss.index, the JSON configs) are written to temp names and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import IngestStats, corpus_fingerprint, expand_corpus_paths, iter_documents
from .errors import IndexFormatError, UserError
from .manifest import MANIFEST, Manifest, sha256_file, write_json_atomic
from .stages.chunks import CHUNKS_BIN, chunk_boundaries, write_chunk_table
from .stages.embeddings import EMBEDDINGS_BIN, EMBEDDINGS_JSON
from .stages.tokenize import DOC_OFFSETS, TOKENS_BIN, check_fits_stream
from .store import insert_documents, metadata_json, open_store
from .tokenizer import load_index_tokenizer

JOURNAL = ".append-journal.json"
APPENDED = (TOKENS_BIN, DOC_OFFSETS, CHUNKS_BIN, EMBEDDINGS_BIN)


def rollback_append(index_dir: Path) -> bool:
    """Undo a journalled append (files truncated to their old sizes, new rows deleted, manifest restored).
    Returns whether there was one."""
    j = index_dir / JOURNAL
    if not j.is_file():
        return False
    journal = json.loads(j.read_text())
    for rel, size in journal["sizes"].items():
        p = index_dir / rel
        if p.is_file() and p.stat().st_size > size:
            with open(p, "r+b") as f:
                f.truncate(size)
    for rel in journal.get("new_files", []):
        (index_dir / rel).unlink(missing_ok=True)
    for rel, backup in journal.get("backups", {}).items():
        if (index_dir / backup).is_file():
            os.replace(index_dir / backup, index_dir / rel)
    db = open_store(index_dir, readonly=False)
    with db.conn:
        db.conn.execute("DELETE FROM documents WHERE id >= ?", [journal["n_docs"]])
        if "chunks" in db.table_names():
            db.conn.execute("DELETE FROM chunks WHERE id >= ?", [journal["n_chunks"]])
    db.close()
    write_json_atomic(index_dir / MANIFEST, journal["manifest"])
    j.unlink()
    return True


def _refresh(index_dir: Path, rec, rels) -> None:
    for rel in rels:
        p = index_dir / rel
        rec.files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}


def append_documents(index_dir: Path | str, corpus_paths: list[str], options: dict[str, Any] | None = None,
                     progress=None) -> dict:
    """Append the documents of `corpus_paths` to the index; returns counts of what was added."""
    index_dir = Path(index_dir)
    options = dict(options or {})
    manifest = Manifest.load(index_dir)
    if rollback_append(index_dir):
        manifest = Manifest.load(index_dir)
    for stage in manifest.stages:
        manifest.require_stage(index_dir, stage)
    if "tokenize" not in manifest.stages:
        raise UserError(f"--append: {index_dir} has no token stream yet; build it first (without --append)")
    if options.get("chunk_len") and "chunks" in manifest.stages and \
            int(options["chunk_len"]) != int(manifest.stages["chunks"].counts.get("chunk_len", 64)):
        raise UserError(f"--chunk-len {options['chunk_len']}: the index was chunked with "
                        f"{manifest.stages['chunks'].counts.get('chunk_len', 64)}; --append keeps its chunk length")
    if options.get("faiss_factory") and "faiss" in manifest.stages and \
            options["faiss_factory"] != manifest.stages["faiss"].params.get("faiss_factory"):
        raise UserError(f"--faiss-factory {options['faiss_factory']}: --append adds to the existing FAISS index "
                        "and cannot change its factory")
    files = expand_corpus_paths(corpus_paths)
    known = {c["path"] for c in manifest.corpus}
    again = [str(f) for f in files if str(f.resolve()) in known]
    if again:
        raise UserError(f"--corpus {again[0]}: already in the index; --append takes new documents only")
    embedder = None
    if "embeddings" in manifest.stages:
        from .embedder import Embedder
        from .stages.embeddings import index_embedder_info

        recorded = manifest.stages["embeddings"].params.get("embedder")
        spec = options.get("embedder") or recorded
        embedder = Embedder.load(spec, device=options.get("device"), batch_tokens=options.get("embed_batch_tokens"))
        if embedder.info.digest != index_embedder_info(index_dir).digest:
            raise UserError(f"--embedder {spec}: the index was embedded with "
                            f"{index_embedder_info(index_dir).name!r}; --append must use the same model")

    tok = load_index_tokenizer(index_dir)
    dtype = manifest.token_dtype
    stats = IngestStats()
    docs = list(iter_documents(files, stats))
    if not docs:
        raise UserError(f"--corpus: no documents found in {len(files)} file(s) ({stats.skipped_empty} empty skipped)")
    ids = tok.encode_batch([d.text for d in docs])
    for d, a in zip(docs, ids):
        check_fits_stream(a, dtype, d.source)

    old_off = np.fromfile(index_dir / DOC_OFFSETS, dtype=np.uint64)
    n_docs, n_tokens = len(old_off) - 1, int(old_off[-1])
    n_chunks = int(manifest.stages["chunks"].counts["chunks"]) if "chunks" in manifest.stages else 0
    journal = {"sizes": {rel: (index_dir / rel).stat().st_size for rel in APPENDED if (index_dir / rel).is_file()},
               "n_docs": n_docs, "n_chunks": n_chunks, "manifest": json.loads(json.dumps(manifest.to_json())), "new_files": [],
               "backups": {}}
    write_json_atomic(index_dir / JOURNAL, journal)
    try:
        out = _apply(index_dir, manifest, docs, ids, files, n_docs, n_tokens, n_chunks, embedder, journal, progress)
    except BaseException:
        rollback_append(index_dir)
        raise
    for backup in journal["backups"].values():
        (index_dir / backup).unlink(missing_ok=True)
    (index_dir / JOURNAL).unlink()
    return out


def _apply(index_dir, manifest, docs, ids, files, n_docs, n_tokens, n_chunks, embedder, journal, progress) -> dict:
    dtype = manifest.token_dtype
    lens = np.array([len(a) for a in ids], dtype=np.int64)
    new_off = n_tokens + np.cumsum(lens).astype(np.uint64)
    # -- token stream and documents ------------------------------------------------------------------
    with open(index_dir / TOKENS_BIN, "ab") as f:
        for a in ids:
            f.write(np.asarray(a).astype(dtype).tobytes())
    with open(index_dir / DOC_OFFSETS, "ab") as f:
        f.write(new_off.tobytes())
    db = open_store(index_dir, readonly=False)
    starts = np.concatenate([[n_tokens], new_off[:-1].astype(np.int64)])
    with db.conn:
        insert_documents(db, [(n_docs + i, d.source, d.external_id, int(s), int(n), metadata_json(d.metadata))
                              for i, (d, s, n) in enumerate(zip(docs, starts, lens))])
    db.close()
    all_off = np.fromfile(index_dir / DOC_OFFSETS, dtype=np.uint64)
    rec = manifest.stages["tokenize"]
    rec.counts["documents"] = n_docs + len(docs)
    rec.counts["tokens"] = int(all_off[-1])
    rec.tables["documents"] = n_docs + len(docs)
    _refresh(index_dir, rec, [TOKENS_BIN, DOC_OFFSETS])
    added = {"documents": len(docs), "tokens": int(lens.sum()), "chunks": 0, "ngram_shard": None}

    # -- chunks ----------------------------------------------------------------------------------------
    if "chunks" in manifest.stages:
        rec = manifest.stages["chunks"]
        chunk_len = int(rec.counts.get("chunk_len", 64))
        sub = np.concatenate([[n_tokens], new_off]).astype(np.int64)
        rows = chunk_boundaries(sub, chunk_len)
        rows[:, 1] += n_docs
        with open(index_dir / CHUNKS_BIN, "ab") as f:
            f.write(rows.astype(np.int64).tobytes())
        write_chunk_table(index_dir, rows, all_off, start_id=n_chunks, replace=False)
        rec.counts["chunks"] = n_chunks + len(rows)
        rec.counts["short_chunks"] = int(rec.counts.get("short_chunks", 0)) + int(rows[:, 3].sum())
        rec.tables["chunks"] = n_chunks + len(rows)
        _refresh(index_dir, rec, [CHUNKS_BIN])
        added["chunks"] = len(rows)

        # -- embeddings and faiss ----------------------------------------------------------------------
        if "embeddings" in manifest.stages and len(rows):
            from .stages.chunks import ChunkTable
            from .stages.embeddings import chunk_texts
            from .stages.tokenize import TokenStream

            tokens = np.memmap(index_dir / TOKENS_BIN, dtype=dtype, mode="r")
            table = ChunkTable(rows, TokenStream(tokens, all_off), chunk_len, np.zeros(0, np.int64))
            texts = chunk_texts(index_dir, table)   # the new chunks only (rows holds global offsets)
            vecs = embedder.encode(texts).astype(np.float16)
            with open(index_dir / EMBEDDINGS_BIN, "ab") as f:
                f.write(vecs.tobytes())
            cfg = json.loads((index_dir / EMBEDDINGS_JSON).read_text())
            _backup(index_dir, EMBEDDINGS_JSON, journal)
            cfg["n"] = n_chunks + len(rows)
            write_json_atomic(index_dir / EMBEDDINGS_JSON, cfg)
            rec = manifest.stages["embeddings"]
            rec.counts["chunks"] = cfg["n"]
            _refresh(index_dir, rec, [EMBEDDINGS_BIN, EMBEDDINGS_JSON])
            if "faiss" in manifest.stages:
                _append_faiss(index_dir, manifest, vecs, journal)

    # -- n-gram shard ----------------------------------------------------------------------------------
    if "ngram" in manifest.stages:
        added["ngram_shard"] = _append_ngram_shard(index_dir, manifest, n_docs, len(docs), int(lens.sum()), journal)

    manifest.corpus = manifest.corpus + corpus_fingerprint(files)
    manifest.save(index_dir)
    return added


def _backup(index_dir: Path, rel: str, journal: dict) -> None:
    backup = rel + ".append-backup"
    shutil.copyfile(index_dir / rel, index_dir / backup)
    journal["backups"][rel] = backup
    write_json_atomic(index_dir / JOURNAL, journal)


def _append_faiss(index_dir: Path, manifest: Manifest, vecs: np.ndarray, journal: dict) -> None:
    import faiss

    from .stages.faiss import FAISS_INDEX, FAISS_JSON

    index = faiss.read_index(str(index_dir / FAISS_INDEX))
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    tmp = index_dir / (FAISS_INDEX + ".tmp")
    faiss.write_index(index, str(tmp))
    _backup(index_dir, FAISS_INDEX, journal)
    _backup(index_dir, FAISS_JSON, journal)
    os.replace(tmp, index_dir / FAISS_INDEX)
    meta = json.loads((index_dir / FAISS_JSON).read_text())
    meta["n"] = int(index.ntotal)
    write_json_atomic(index_dir / FAISS_JSON, meta)
    rec = manifest.stages["faiss"]
    rec.counts["vectors"] = int(index.ntotal)
    _refresh(index_dir, rec, [FAISS_INDEX, FAISS_JSON])


def _append_ngram_shard(index_dir: Path, manifest: Manifest, doc_lo: int, n_new: int, n_tokens: int,
                        journal: dict) -> int:
    """One new infini-gram shard of the new documents, built by the n-gram stage's build_shard."""
    from ..ngram.build import NGRAM_DIR, ShardPlan, build_shard, write_metadata
    from ..ngram.shards import shard_ids

    ngram_dir = index_dir / NGRAM_DIR
    k = max(shard_ids(ngram_dir), default=-1) + 1
    tmp = index_dir / ".tmp-append-ngram"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        plan = ShardPlan(k, doc_lo, doc_lo + n_new, n_tokens + n_new)
        build_shard(str(index_dir), str(tmp), plan, manifest.token_width)
        write_metadata(index_dir, tmp, [plan])
        moved = []
        for f in sorted(tmp.iterdir()):
            rel = f"{NGRAM_DIR}/{f.name}"
            if (index_dir / rel).exists():
                raise IndexFormatError(f"{index_dir / rel}: already exists; cannot add n-gram shard {k}")
            journal["new_files"].append(rel)
            write_json_atomic(index_dir / JOURNAL, journal)
            os.replace(f, index_dir / rel)
            moved.append(rel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec = manifest.stages["ngram"]
    rec.counts["shards"] = int(rec.counts.get("shards", 0)) + 1
    rec.counts["tokens"] = int(rec.counts.get("tokens", 0)) + n_tokens + n_new
    rec.counts["documents"] = int(rec.counts.get("documents", 0)) + n_new
    _refresh(index_dir, rec, moved)
    return k
