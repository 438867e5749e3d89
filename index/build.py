"""The build-index orchestrator: stages run in order, each into a temporary directory that is moved into
the index only when the stage succeeds, then recorded in the manifest with counts and checksums.

A rerun skips every stage whose record, parameters and checksums still match, so a killed build resumes;
a stage that reruns invalidates the stages that depend on it.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .handle import Index
from .manifest import MANIFEST, Manifest, StageRecord, sha256_file
from .store import STORE, open_store, table_rows
from .tokenizer import load_index_tokenizer, load_tokenizer, tokenizer_identity


@dataclass
class StageOutput:
    counts: dict[str, int]
    tables: dict[str, int] = field(default_factory=dict)  # store.sqlite tables this stage wrote -> rows


@dataclass(frozen=True)
class Stage:
    """One step of build-index, owned by the package whose data it writes (see stages/__init__.py).

    run: builds the stage's files from the corpus or earlier stages (StageContext -> StageOutput).
    append: adds `build-index --append`'s new documents to what run built, in place: appends to its files,
        rows and manifest record, through AppendContext (which also carries what earlier stages appended),
        so that a later build finds the stage up to date. None: the stage cannot take new documents, and an
        index that has it refuses --append.
    check_append: refuses an append the stage cannot take (e.g. options that contradict how it was built),
        before anything is written. Optional.
    order: its place in the pipeline: stages run by increasing order, each after the stages it requires.
    """

    name: str
    requires: tuple[str, ...]
    run: Callable[["StageContext"], StageOutput]
    option_keys: tuple[str, ...] = ()   # build options that change this stage's output
    summary: str = ""
    append: Callable[["AppendContext"], None] | None = None
    check_append: Callable[["AppendContext"], None] | None = None
    order: int = 0


@dataclass
class StageContext:
    """What a stage sees. It reads earlier stages through `index` (the index as built so far: its token
    stream, chunks, embeddings) and writes its own files under `tmp_dir` at the paths they will have in
    the index (e.g. tmp_dir / "ngram" / "table.0")."""

    index_dir: Path
    tmp_dir: Path
    manifest: Manifest
    options: dict[str, Any]
    corpus_files: list[Path]
    tokenizer: Any
    progress: Any = None   # rich.progress.Progress or None
    index: Index = field(init=False)

    def __post_init__(self):
        self.index = Index(self.index_dir, self.manifest)   # this stage's view: the manifest as built so far

    def track(self, description: str, total: float | None = None):
        return _Task(self.progress, description, total)


@dataclass
class AppendContext:
    """What a stage's append sees (index/append.py runs them in pipeline order).

    `index` is the index as it was before the append, whose manifest each stage updates in place (its
    record's counts, tables and files: `record`, `refresh`); the handle's parts (tokens, chunks, ...) are
    the old ones, so a stage reads what earlier stages appended from the fields below, which they set.
    Files are appended to (the journal truncates them back on failure) or replaced whole after
    `journal.backup(rel)`; a new file is announced with `journal.new_file(rel)` before it is moved in."""

    index: Index
    options: dict[str, Any]
    docs: list                    # the new documents (corpus.Document), in order
    journal: Any = None           # append.Journal: set once every check_append has passed
    progress: Any = None
    # set by the stages as they append, for the ones after them:
    doc_lo: int = 0               # tokenize: the id of the first new document (documents before the append)
    token_lo: int = 0             # tokenize: the offset of the first new token
    doc_offsets: Any = None       # tokenize: every document's token offsets after the append, u64 [n_docs + 1]
    chunk_lo: int = 0             # chunks: the id of the first new chunk
    chunk_rows: Any = None        # chunks: the new chunks, int64 [m, 4] (as chunks.bin)
    vectors: Any = None           # embeddings: the new chunks' embeddings, float16 [m, dim]
    prepared: dict[str, Any] = field(default_factory=dict)   # a stage's check_append -> its append
    added: dict[str, Any] = field(default_factory=dict)      # what append_documents returns

    @property
    def index_dir(self) -> Path:
        return self.index.dir

    @property
    def manifest(self) -> Manifest:
        return self.index.manifest

    def record(self, stage: str) -> StageRecord:
        return self.manifest.stages[stage]

    def refresh(self, stage: str, rels) -> None:
        """Record the new size and checksum of the stage's files `rels` (paths relative to the index)."""
        rec = self.record(stage)
        for rel in rels:
            p = self.index_dir / rel
            rec.files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}


class _Task:
    def __init__(self, progress, description, total):
        self.progress = progress
        self.id = progress.add_task(description, total=total) if progress is not None else None

    def advance(self, n: float = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.id, n)

    def update(self, **kw) -> None:
        if self.progress is not None:
            self.progress.update(self.id, **kw)


def resolve_stages(all_stages: list[Stage], requested: list[str] | None) -> list[Stage]:
    """The requested stages plus their prerequisites, in pipeline order."""
    by_name = {s.name: s for s in all_stages}
    if not requested:
        return list(all_stages)
    unknown = [r for r in requested if r not in by_name]
    if unknown:
        raise UserError(f"--stages: unknown stage {unknown[0]!r}; expected some of {', '.join(by_name)}")
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in wanted:
            wanted.add(name)
            for dep in by_name[name].requires:
                add(dep)

    for r in requested:
        add(r)
    return [s for s in all_stages if s.name in wanted]


def _stage_params(stage: Stage, options: dict[str, Any]) -> dict[str, Any]:
    return {k: options.get(k) for k in stage.option_keys}


def stage_is_current(index_dir: Path, manifest: Manifest, stage: Stage, options: dict[str, Any]) -> bool:
    rec = manifest.stages.get(stage.name)
    if rec is None or rec.params != _stage_params(stage, options):
        return False
    for rel, info in rec.files.items():
        p = index_dir / rel
        if not p.is_file() or p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
            return False
    if rec.tables:
        try:
            db = open_store(index_dir)
            if any(table_rows(db, t) != n for t, n in rec.tables.items()):
                return False
        except UserError:
            return False
    return True


def _dependents(all_stages: list[Stage], name: str) -> set[str]:
    out: set[str] = set()
    for s in all_stages:
        if name in s.requires or out.intersection(s.requires):
            out.add(s.name)
    return out


def _move_into(tmp_dir: Path, index_dir: Path) -> list[str]:
    moved = []
    for root, _, files in os.walk(tmp_dir):
        for f in files:
            src = Path(root) / f
            rel = src.relative_to(tmp_dir)
            dst = index_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            moved.append(str(rel))
    return sorted(moved)


def _disk_error(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@dataclass
class BuildSummary:
    index_dir: str
    ran: list[str]
    skipped: list[str]
    counts: dict[str, dict[str, int]]
    seconds: dict[str, float]

    def to_json(self) -> dict:
        return self.__dict__.copy()


def prepare_index_dir(out: Path, tokenizer, corpus_files: list[Path], corpus_fp: list[dict], force: bool) -> tuple[Manifest, bool]:
    """Open or create the index directory; refuse one that holds something else. Returns (manifest, created)."""
    created = False
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.exists() and (out / MANIFEST).is_file():
        manifest = Manifest.load(out)
        tok_id = _identity_of(tokenizer)
        if manifest.tokenizer.get("sha256") != tok_id["sha256"] and not force:
            raise UserError(f"--out {out}: holds an index built with tokenizer {manifest.tokenizer.get('name')!r} "
                            f"(sha256 {manifest.tokenizer.get('sha256', '')[:12]}), not {tok_id['name']!r}; "
                            "choose another --out or pass --force to rebuild it")
        if _corpus_key(manifest.corpus) != _corpus_key(corpus_fp) and not force:
            raise UserError(f"--out {out}: holds an index of another corpus ({len(manifest.corpus)} files, first "
                            f"{manifest.corpus[0]['path'] if manifest.corpus else '-'}); choose another --out, pass "
                            "--force to rebuild it, or --append to add documents")
        if not force:
            return manifest, False
        _clear_index(out)
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: directory is not empty and holds no retrogram index (no {MANIFEST}); "
                        "choose an empty or new directory")
    else:
        created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp-tokenizer"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    os.replace(tmp, out / "tokenizer")
    manifest = Manifest(tokenizer=tokenizer_identity(tokenizer, out / "tokenizer"), corpus=corpus_fp)
    manifest.save(out)
    return manifest, created


def _identity_of(tokenizer) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(Path(d))
        return tokenizer_identity(tokenizer, Path(d))


def _corpus_key(fp: list[dict]) -> list[tuple]:
    return [(c["path"], c["size"], c["mtime_ns"]) for c in fp]


def _clear_index(out: Path) -> None:
    """Remove what a retrogram index holds (called only on a directory with our manifest)."""
    for p in out.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def run_build(out: Path, corpus_paths: list[str] | None, tokenizer_spec: str | None, all_stages: list[Stage],
              requested: list[str] | None = None, force: bool = False, options: dict[str, Any] | None = None,
              progress=None, log: Callable[[str], None] | None = None) -> BuildSummary:
    """Build (or resume) the requested stages of the index in `out`. Without corpus_paths, an existing index
    is built from the corpus its manifest records; without tokenizer_spec, with the tokenizer it records
    (unless force, which builds anew: then the default tokenizer). log: told each stage's start and end."""
    from .corpus import corpus_fingerprint, expand_corpus_paths

    options = dict(options or {})
    stages = resolve_stages(all_stages, requested)
    out = Path(out)
    recorded = Manifest.load(out) if (out / MANIFEST).is_file() else None
    files = expand_corpus_paths(corpus_paths or _recorded_corpus(out, recorded))
    if tokenizer_spec is None and recorded is not None and not force:
        tokenizer = load_index_tokenizer(out)
    else:
        tokenizer = load_tokenizer(tokenizer_spec)
    manifest, created = prepare_index_dir(out, tokenizer, files, corpus_fingerprint(files), force)
    summary = BuildSummary(str(out), [], [], {}, {})
    try:
        for stage in stages:
            if not force and stage_is_current(out, manifest, stage, options):
                summary.skipped.append(stage.name)
                summary.counts[stage.name] = manifest.stages[stage.name].counts
                if log:
                    log(f"stage {stage.name}: up to date")
                continue
            if log:
                log(f"stage {stage.name}: started")
            for dep in _dependents(all_stages, stage.name):   # their inputs are about to change
                manifest.stages.pop(dep, None)
            manifest.stages.pop(stage.name, None)
            manifest.save(out)
            rec = _run_stage(stage, out, manifest, options, files, tokenizer, progress)
            manifest.stages[stage.name] = rec
            manifest.save(out)
            summary.ran.append(stage.name)
            summary.counts[stage.name] = rec.counts
            summary.seconds[stage.name] = round(rec.seconds, 3)
            if log:
                log(f"stage {stage.name}: done in {rec.seconds:.1f} s (" +
                    ", ".join(f"{k} {v:,}" for k, v in rec.counts.items()) + ")")
    except BaseException:
        if created and not manifest.stages:
            shutil.rmtree(out, ignore_errors=True)   # nothing finished: leave no half-written index
        raise
    return summary


def _recorded_corpus(out: Path, recorded: Manifest | None) -> list[str]:
    """The corpus files an existing index was built from (to add stages to it without --corpus)."""
    if recorded is None:
        raise UserError(f"--corpus: required (--out {out} holds no index whose corpus could be used)")
    paths = [c["path"] for c in recorded.corpus]
    gone = [p for p in paths if not Path(p).exists()]
    if gone:
        raise UserError(f"--corpus: not given, and {gone[0]}, which {out} was built from, is gone; pass --corpus")
    return paths


def _run_stage(stage: Stage, out: Path, manifest: Manifest, options, files, tokenizer, progress) -> StageRecord:
    tmp = out / f".tmp-{stage.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ctx = StageContext(out, tmp, manifest, options, files, tokenizer, progress)
    t0 = time.perf_counter()
    try:
        result = stage.run(ctx)
        moved = _move_into(tmp, out)
    except OSError as e:
        if _disk_error(e):
            raise UserError(f"{e.filename or out}: disk full while running stage '{stage.name}' "
                            f"({os.strerror(e.errno)}); its partial output was removed") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = _stage_params(stage, options)
    file_info = {rel: {"size": (out / rel).stat().st_size, "sha256": sha256_file(out / rel)}
                 for rel in moved if rel != STORE}
    return StageRecord(counts=result.counts, params=params, files=file_info, tables=dict(result.tables), seconds=time.perf_counter() - t0)
