"""Corpus ingestion: JSON Lines, plain text files and directories of them, gzip/zstd compressed; streamed.

A JSONL record needs a string `text`; `id` becomes the external id; every other field is kept as metadata.
A plain text file is one document. Empty (whitespace-only) documents are skipped and counted; anything
malformed stops the build with the file and line named.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSED = (".gz", ".zst")


@dataclass
class Document:
    text: str
    source: str                      # the file it came from
    external_id: str | None = None   # the record's `id`, if any
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class IngestStats:
    files: int = 0
    documents: int = 0
    skipped_empty: int = 0
    bytes_read: int = 0


def _base_suffix(path: Path) -> str:
    """'.jsonl' for data.jsonl.zst, '.txt' for a.txt.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _open_binary(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        import zstandard

        # BufferedReader adds the line iteration zstandard's reader lacks
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def expand_corpus_paths(paths: list[str | Path]) -> list[Path]:
    """Every input file, in a stable order: files as given, directories walked sorted (hidden entries skipped)."""
    if not paths:
        raise UserError("--corpus: at least one file or directory is needed")
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"--corpus {p}: no such file or directory")
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
            if not found:
                raise UserError(f"--corpus {p}: directory holds no files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"--corpus {p}: not a regular file or directory")
        for f in out:
            if not os.access(f, os.R_OK):
                raise UserError(f"--corpus {f}: not readable (permission denied)")
    return out


def corpus_fingerprint(files: list[Path]) -> list[dict[str, Any]]:
    """What the manifest records of the input, so a resumed build knows it is the same corpus."""
    return [{"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


@dataclass
class RawBatch:
    """Undecoded input for one worker task: JSONL lines (from `first_line` on) or one whole text file."""

    path: str
    kind: str            # "jsonl" or "text"
    first_line: int
    items: list[bytes]


def iter_raw_batches(files: list[Path], stats: IngestStats, max_bytes: int = 1 << 20,
                     max_docs: int = 4096) -> Iterator[RawBatch]:
    """Read the corpus as byte batches without parsing them, so parsing can run in worker processes."""
    for f in files:
        stats.files += 1
        try:
            with _open_binary(f) as raw:
                if _base_suffix(f) not in JSONL_SUFFIXES:
                    data = raw.read()
                    stats.bytes_read += len(data)
                    yield RawBatch(str(f), "text", 1, [data])
                    continue
                lines, size, first = [], 0, 1
                for lineno, line in enumerate(raw, 1):
                    stats.bytes_read += len(line)
                    lines.append(line)
                    size += len(line)
                    if size >= max_bytes or len(lines) >= max_docs:
                        yield RawBatch(str(f), "jsonl", first, lines)
                        lines, size, first = [], 0, lineno + 1
                if lines:
                    yield RawBatch(str(f), "jsonl", first, lines)
        except (OSError, EOFError) as e:
            raise UserError(f"{f}: cannot read ({e})") from None
        except Exception as e:  # zstd/gzip raise their own types for corrupt input
            if type(e).__module__.startswith(("zstandard", "gzip", "zlib")) or isinstance(e, io.UnsupportedOperation):
                raise UserError(f"{f}: corrupt compressed file ({e})") from None
            raise


def _parse_jsonl_line(path: str, lineno: int, line: bytes) -> Document | None:
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(rec, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object with a \"text\" field, got {type(rec).__name__}")
    text = rec.pop("text", None)
    if not isinstance(text, str):
        what = "no \"text\" field" if text is None else f"\"text\" is {type(text).__name__}, expected a string"
        raise UserError(f"{path}:{lineno}: {what}")
    ext = rec.pop("id", None)
    return Document(text=text, source=path, external_id=None if ext is None else str(ext), metadata=rec)


def _parse_text_file(path: str, data: bytes) -> Document:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    return Document(text=text.removeprefix("\ufeff"), source=path, external_id=Path(path).name)


def parse_batch(batch: RawBatch) -> tuple[list[Document], int]:
    """-> (non-empty documents, number of empty ones skipped). Raises UserError naming file and line."""
    if batch.kind == "text":
        docs = [_parse_text_file(batch.path, batch.items[0])]
    else:
        docs = [_parse_jsonl_line(batch.path, batch.first_line + i, line) for i, line in enumerate(batch.items)]
        docs = [d for d in docs if d is not None]      # blank lines are not documents
    kept = [d for d in docs if d.text.strip()]
    return kept, len(docs) - len(kept)


def iter_documents(files: list[Path], stats: IngestStats | None = None) -> Iterator[Document]:
    """Stream the documents of every file in order, parsed in this process."""
    stats = stats if stats is not None else IngestStats()
    for batch in iter_raw_batches(files, stats):
        docs, skipped = parse_batch(batch)
        stats.skipped_empty += skipped
        stats.documents += len(docs)
        yield from docs
