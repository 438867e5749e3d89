"""Corpus ingestion: every input format, metadata, empty documents, and every malformed input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from retrogram.index.corpus import IngestStats, expand_corpus_paths, iter_documents, iter_raw_batches
from retrogram.index.errors import UserError

from conftest import write_jsonl

RECORDS = [
    {"id": "a", "text": "first document\nwith two lines", "lang": "en", "tags": ["x", "y"]},
    {"id": 7, "text": "second: ünïcödé ✓"},
    {"text": "   "},                       # empty: skipped and counted
    {"text": "no id here", "score": 0.5},
]


def docs_of(paths) -> tuple[list, IngestStats]:
    stats = IngestStats()
    return list(iter_documents(expand_corpus_paths(paths), stats)), stats


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson"])
def test_jsonl_formats(tmp_path, suffix):
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS).encode()
    path = tmp_path / f"c{suffix}"
    if suffix.endswith(".gz"):
        path.write_bytes(gzip.compress(raw))
    elif suffix.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        path.write_bytes(raw)
    docs, stats = docs_of([path])
    assert [d.text for d in docs] == ["first document\nwith two lines", "second: ünïcödé ✓", "no id here"]
    assert [d.external_id for d in docs] == ["a", "7", None]
    assert docs[0].metadata == {"lang": "en", "tags": ["x", "y"]}
    assert docs[2].metadata == {"score": 0.5}
    assert stats.skipped_empty == 1 and stats.documents == 3
    assert all(d.source == str(path) for d in docs)


def test_text_files_directories_and_several_paths(tmp_path):
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee")
    (d / "a.txt").write_text("\ufeffay")               # BOM dropped
    (d / "sub" / "c.txt.gz").write_bytes(gzip.compress("sea".encode()))
    (d / ".hidden").write_text("never read")
    (d / "empty.txt").write_text("\n\n")
    j = write_jsonl(tmp_path / "x.jsonl", [{"text": "jay"}])
    docs, stats = docs_of([d, j])
    assert [d.text for d in docs] == ["ay", "bee", "sea", "jay"]     # sorted walk, then the next path
    assert [d.external_id for d in docs[:3]] == ["a.txt", "b.txt", "c.txt.gz"]
    assert stats.skipped_empty == 1 and stats.files == 5


def test_raw_batches_are_bounded(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"text": f"doc {i} " + "w" * 100} for i in range(1000)])
    batches = list(iter_raw_batches([path], IngestStats(), max_bytes=10_000, max_docs=50))
    assert len(batches) > 10
    assert all(len(b.items) <= 50 and sum(map(len, b.items)) < 10_000 + 200 for b in batches)
    assert [b.first_line for b in batches[:3]] == [1, 1 + len(batches[0].items), 1 + len(batches[0].items) + len(batches[1].items)]


@pytest.mark.parametrize("content, expected", [
    (b'{"text": "ok"}\n{"text": "broken"\n', r"bad\.jsonl:2: not valid JSON"),
    (b'{"text": "ok"}\n\n{"txt": "x"}\n', r"bad\.jsonl:3: no \"text\" field"),
    (b'{"text": 5}\n', r"bad\.jsonl:1: \"text\" is int, expected a string"),
    (b'["text"]\n', r"bad\.jsonl:1: expected a JSON object"),
    (b'{"text": "caf\xe9"}\n', r"bad\.jsonl:1: not UTF-8"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        docs_of([path])


def test_non_utf8_text_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\nline two caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt:2: not UTF-8"):
        docs_of([path])


def test_missing_unreadable_and_corrupt(tmp_path):
    with pytest.raises(UserError, match=r"--corpus .*nope\.jsonl: no such file"):
        expand_corpus_paths([tmp_path / "nope.jsonl"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="directory holds no files"):
        expand_corpus_paths([tmp_path / "empty_dir"])
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"this is not gzip data at all")
    with pytest.raises(UserError, match=r"bad\.jsonl\.gz: cannot read|corrupt"):
        docs_of([bad])
    badz = tmp_path / "bad.jsonl.zst"
    badz.write_bytes(b"this is not zstd data at all")
    with pytest.raises(UserError, match=r"bad\.jsonl\.zst: (cannot read|corrupt)"):
        docs_of([badz])
