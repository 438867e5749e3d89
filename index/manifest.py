"""IDX/manifest.json: format version, tokenizer identity, and the stages done with counts and checksums."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IndexFormatError, UserError

FORMAT_NAME = "retrogram-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write to a temp name, fsync, rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, error=UserError, what: str = "file") -> Any:
    """A JSON file's value, or `error` naming the file when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable {what} ({e})") from None


@dataclass
class StageRecord:
    counts: dict[str, int]
    params: dict[str, Any]
    files: dict[str, dict[str, Any]]  # relative path -> {"size", "sha256"}
    tables: dict[str, int] = field(default_factory=dict)  # store.sqlite table -> rows written
    finished_at: float = field(default_factory=time.time)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"counts": self.counts, "params": self.params, "files": self.files,
                "tables": self.tables, "finished_at": self.finished_at, "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict) -> "StageRecord":
        return cls(counts=d["counts"], params=d["params"], files=d["files"],
                   tables=d.get("tables", {}), finished_at=d.get("finished_at", 0.0), seconds=d.get("seconds", 0.0))


@dataclass
class Manifest:
    """What an index directory holds. `tokenizer` is {name, sha256, vocab_size, token_width, eos_token_id}."""

    tokenizer: dict[str, Any]
    corpus: list[dict[str, Any]]
    stages: dict[str, StageRecord] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def token_width(self) -> int:
        return int(self.tokenizer["token_width"])

    @property
    def token_dtype(self):
        from .tokenizer import TOKEN_DTYPES

        return TOKEN_DTYPES[self.token_width]

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": self.version, "tokenizer": self.tokenizer,
                "corpus": self.corpus, "stages": {k: v.to_json() for k, v in self.stages.items()}}

    def save(self, index_dir: Path) -> None:
        write_json_atomic(Path(index_dir) / MANIFEST, self.to_json())

    @classmethod
    def load(cls, index_dir: Path | str) -> "Manifest":
        path = Path(index_dir) / MANIFEST
        if not Path(index_dir).is_dir():
            raise IndexFormatError(f"{index_dir}: no such index directory")
        if not path.is_file():
            raise IndexFormatError(f"{path}: missing; {index_dir} is not a retrogram index (run `retrogram build-index`)")
        d = read_json(path, IndexFormatError, "manifest")
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise IndexFormatError(f"{path}: not a retrogram manifest (format {d.get('format')!r} if any)")
        if d.get("version") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{path}: index format version {d.get('version')}, this retrogram reads version {FORMAT_VERSION}; rebuild it")
        try:
            return cls(tokenizer=d["tokenizer"], corpus=d["corpus"],
                       stages={k: StageRecord.from_json(v) for k, v in d["stages"].items()}, version=d["version"])
        except (KeyError, TypeError) as e:
            raise IndexFormatError(f"{path}: malformed manifest (missing {e})") from None

    def require_stage(self, index_dir: Path | str, stage: str) -> StageRecord:
        """The stage's record, after checking that its files are present with their recorded sizes."""
        if stage not in self.stages:
            raise IndexFormatError(
                f"{index_dir}: the index has no '{stage}' stage (built: {', '.join(self.stages) or 'none'}); "
                f"run `retrogram build-index --out {index_dir} --stages {stage}`")
        rec = self.stages[stage]
        for rel, info in rec.files.items():
            p = Path(index_dir) / rel
            if not p.exists():
                raise IndexFormatError(f"{p}: missing (recorded by stage '{stage}')")
            if p.stat().st_size != info["size"]:
                raise IndexFormatError(
                    f"{p}: truncated or changed ({p.stat().st_size} bytes, manifest says {info['size']})")
        return rec
