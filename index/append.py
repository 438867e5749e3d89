"""`build-index --append`: add documents to a built index without a rebuild.

Each stage of the index appends its own part (`Stage.append`, next to its `run`), in pipeline order, as
`run_build` runs them: tokenize appends the new documents to the token stream and the documents table
(ids continue); ngram builds them into one new shard IDX/ngram/*.K; chunks cuts them into chunks
(chunks.bin and the chunks table); embeddings embeds those with the index's embedder (embeddings.f16);
faiss adds the vectors to its index (an IVF index keeps its trained centroids). Each updates its manifest
record (file sizes and checksums, counts, table rows), so a later `build-index` finds every stage up to
date. Before anything is written, every stage's `check_append` may refuse the append (options that
contradict how the index was built), and the documents are read; a stage without `append` refuses it.

Failure safety (this module): before any stage appends, the sizes of the files the manifest records, the
rows of its tables and a copy of the manifest go to IDX/.append-journal.json; a stage announces a new file
before creating it and backs up a whole file before replacing it (written to a temp name and renamed).
Any error rolls every file, table and the manifest back, and a journal left by a killed run is rolled back
at the start of the next append (or by `rollback_append`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .build import AppendContext, Stage
from .corpus import IngestStats, corpus_fingerprint, expand_corpus_paths, iter_documents
from .errors import UserError
from .handle import Index
from .manifest import MANIFEST, write_json_atomic
from .store import open_store

JOURNAL = ".append-journal.json"


class Journal:
    """IDX/.append-journal.json: what rollback_append needs to undo an append."""

    def __init__(self, index_dir: Path, data: dict):
        self.index_dir = index_dir
        self.data = data

    @classmethod
    def begin(cls, index: Index) -> "Journal":
        """Record every file the manifest lists (its size), every table it counts (its rows) and the manifest."""
        m = index.manifest
        sizes = {rel: (index.dir / rel).stat().st_size for rec in m.stages.values() for rel in rec.files
                 if (index.dir / rel).is_file()}
        tables = {t: n for rec in m.stages.values() for t, n in rec.tables.items()}
        journal = cls(index.dir, {"sizes": sizes, "tables": tables, "manifest": json.loads(json.dumps(m.to_json())),
                                  "new_files": [], "backups": {}})
        journal.save()
        return journal

    def save(self) -> None:
        write_json_atomic(self.index_dir / JOURNAL, self.data)

    def new_file(self, rel: str) -> None:
        """Before a file that did not exist is created: rollback deletes it."""
        self.data["new_files"].append(rel)
        self.save()

    def backup(self, rel: str) -> None:
        """Before a whole file is replaced: a copy beside it, which rollback puts back."""
        backup = rel + ".append-backup"
        shutil.copyfile(self.index_dir / rel, self.index_dir / backup)
        self.data["backups"][rel] = backup
        self.save()

    def finish(self) -> None:
        for backup in self.data["backups"].values():
            (self.index_dir / backup).unlink(missing_ok=True)
        (self.index_dir / JOURNAL).unlink()


def rollback_append(index_dir: Path) -> bool:
    """Undo a journalled append (files truncated to their old sizes, new files deleted, replaced files put
    back, new rows deleted, manifest restored). Returns whether there was one."""
    index_dir = Path(index_dir)
    j = index_dir / JOURNAL
    if not j.is_file():
        return False
    journal = json.loads(j.read_text())
    backups = journal.get("backups", {})
    for rel, size in journal["sizes"].items():
        p = index_dir / rel
        if rel not in backups and p.is_file() and p.stat().st_size > size:
            with open(p, "r+b") as f:
                f.truncate(size)
    for rel in journal.get("new_files", []):
        (index_dir / rel).unlink(missing_ok=True)
    for rel, backup in backups.items():
        if (index_dir / backup).is_file():
            os.replace(index_dir / backup, index_dir / rel)
    # rows are numbered from 0 in every table a stage counts (documents, chunks): the new ones are id >= n
    tables = journal.get("tables") or {"documents": journal["n_docs"], "chunks": journal["n_chunks"]}  # older journals
    db = open_store(index_dir, readonly=False)
    with db.conn:
        for table, n in tables.items():
            if table in db.table_names():
                db.conn.execute(f'DELETE FROM "{table}" WHERE id >= ?', [n])
    db.close()
    write_json_atomic(index_dir / MANIFEST, journal["manifest"])
    j.unlink()
    return True


def append_stages(index: Index, stages: list[Stage]) -> list[Stage]:
    """The stages the index has, in pipeline order; each must be known and able to append."""
    by_name = {s.name: s for s in stages}
    for name in index.manifest.stages:
        if name not in by_name:
            raise UserError(f"--append: {index.dir} has the '{name}' stage, which no imported package provides "
                            "(import the package that builds it, e.g. retrogram.ngram)")
        if by_name[name].append is None:
            raise UserError(f"--append: the '{name}' stage cannot take new documents; rebuild the index with them")
    return [s for s in stages if s.name in index.manifest.stages]


def append_documents(index_dir: Path | str, corpus_paths: list[str], options: dict[str, Any] | None = None,
                     progress=None, stages: list[Stage] | None = None) -> dict:
    """Append the documents of `corpus_paths` to the index; returns what was added: {documents, tokens,
    chunks, ngram_shard} (0 / None for a stage the index does not have). stages: the pipeline's
    (default: every registered stage, index.stages.pipeline_stages())."""
    from .stages import pipeline_stages

    options = dict(options or {})
    index = Index.open(index_dir)
    if rollback_append(index.dir):
        index = Index.open(index.dir)
    for name in index.manifest.stages:
        index.require(name)
    if not index.has("tokenize"):
        raise UserError(f"--append: {index.dir} has no token stream yet; build it first (without --append)")
    order = append_stages(index, stages if stages is not None else pipeline_stages())
    files = expand_corpus_paths(corpus_paths)
    known = {c["path"] for c in index.manifest.corpus}
    again = [str(f) for f in files if str(f.resolve()) in known]
    if again:
        raise UserError(f"--corpus {again[0]}: already in the index; --append takes new documents only")
    ctx = AppendContext(index, options, docs=[], progress=progress,
                        added={"documents": 0, "tokens": 0, "chunks": 0, "ngram_shard": None})
    for stage in order:
        if stage.check_append is not None:
            stage.check_append(ctx)
    stats = IngestStats()
    ctx.docs = list(iter_documents(files, stats))
    if not ctx.docs:
        raise UserError(f"--corpus: no documents found in {len(files)} file(s) ({stats.skipped_empty} empty skipped)")

    ctx.journal = Journal.begin(index)
    try:
        for stage in order:
            stage.append(ctx)
        index.manifest.corpus = index.manifest.corpus + corpus_fingerprint(files)
        index.manifest.save(index.dir)
    except BaseException:
        rollback_append(index.dir)
        raise
    ctx.journal.finish()
    return ctx.added
