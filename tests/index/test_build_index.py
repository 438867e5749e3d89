"""`retrogram build-index` / `info`: the index directory, the manifest, resume, and every bad input."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl
from retrogram.index.manifest import Manifest, sha256_file
from retrogram.index.store import open_store
from retrogram.index.stages.tokenize import TokenStream
from retrogram.index.tokenizer import load_index_tokenizer
from retrogram.services.cli import main
from retrogram.services.launch import retrogram_command

DOCS = [{"id": "d0", "text": "to be or not to be", "act": 1},
        {"id": "d1", "text": "that is the question ✓"},
        {"id": "d2", "text": ""},
        {"id": "d3", "text": "whether 'tis nobler in the mind"}]


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli(*argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_bytes_index_layout_manifest_and_info(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    out = tmp_path / "idx"
    code, stdout, _ = run_cli(capsys, "build-index", "--corpus", corpus, "--out", out, "--tokenizer", "bytes",
                              "--stages", "tokenize", "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["ran"] == ["tokenize"]
    assert summary["counts"]["tokenize"] == {"documents": 3, "tokens": 18 + 24 + 31, "files": 1,
                                             "skipped_empty": 1, "bytes": corpus.stat().st_size}
    stream = TokenStream.open(out)
    kept = [d for d in DOCS if d["text"]]
    assert stream.tokens.dtype == np.uint8 and stream.n_docs == 3
    for i, d in enumerate(kept):
        assert stream.doc(i).tobytes().decode() == d["text"]
    rows = list(open_store(out).query("SELECT * FROM documents ORDER BY id"))
    assert [(r["id"], r["external_id"], r["token_offset"], r["token_len"]) for r in rows] == \
        [(0, "d0", 0, 18), (1, "d1", 18, 24), (2, "d3", 42, 31)]
    assert json.loads(rows[0]["metadata"]) == {"act": 1} and rows[1]["metadata"] is None
    m = Manifest.load(out)
    assert m.tokenizer["name"] == "bytes" and m.token_width == 1
    rec = m.stages["tokenize"]
    assert set(rec.files) == {"tokens/tokens.bin", "tokens/doc_offsets.bin"}
    assert all(sha256_file(out / f) == v["sha256"] for f, v in rec.files.items())
    assert rec.tables == {"documents": 3}
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())
    assert load_index_tokenizer(out).decode(stream.doc(1)) == "that is the question ✓"

    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["documents"] == 3 and info["tokens"] == 73 and "tokenize" in info["stages"]

    # rerun: up to date, skipped; --force: rebuilt, same files
    code, stdout, _ = run_cli(capsys, "build-index", "--corpus", corpus, "--out", out, "--tokenizer", "bytes",
                              "--stages", "tokenize", "--json")
    assert code == 0 and json.loads(stdout)["skipped"] == ["tokenize"]
    code, stdout, _ = run_cli(capsys, "build-index", "--corpus", corpus, "--out", out, "--tokenizer", "bytes",
                              "--stages", "tokenize", "--json", "--force")
    assert code == 0 and json.loads(stdout)["ran"] == ["tokenize"]
    assert Manifest.load(out).stages["tokenize"].files == rec.files


def test_truncated_stage_file_is_rebuilt_and_named(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    out = tmp_path / "idx"
    assert cli("build-index", "--corpus", corpus, "--out", out, "--tokenizer", "bytes", "--stages", "tokenize") == 0
    with open(out / "tokens" / "tokens.bin", "r+b") as f:
        f.truncate(10)
    code, _, err = run_cli(capsys, "info", out)
    assert code == 2 and "tokens.bin: truncated" in err
    code, stdout, _ = run_cli(capsys, "build-index", "--corpus", corpus, "--out", out, "--tokenizer", "bytes",
                              "--stages", "tokenize", "--json")
    assert code == 0 and json.loads(stdout)["ran"] == ["tokenize"]
    assert TokenStream.open(out).n_docs == 3


def test_default_tokenizer_index(small_index, small_corpus):
    m = Manifest.load(small_index)
    assert m.tokenizer["name"] == "smollm2" and m.tokenizer["vocab_size"] == 49152 and m.token_width == 2
    tok = load_index_tokenizer(small_index)
    stream = TokenStream.open(small_index)
    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    assert stream.n_docs == len(texts)
    for i, text in enumerate(texts):
        assert stream.doc(i).tolist() == tok.encode(text).tolist()
    assert tok.decode(stream.doc(0)) == texts[0]


def test_tokenizer_directory_and_parallel_workers_match(tmp_path, small_index, small_corpus, capsys):
    """An HF tokenizer directory (the index's own copy) and 2 worker processes give the same stream."""
    out = tmp_path / "idx2"
    code = cli("build-index", "--corpus", small_corpus, "--out", out, "--tokenizer", small_index / "tokenizer",
               "--stages", "tokenize", "--workers", "2", "--no-progress")
    assert code == 0
    a, b = TokenStream.open(small_index), TokenStream.open(out)
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert np.array_equal(a.doc_offsets, b.doc_offsets)


# -- bad input: one line naming the file, exit 2, no index left behind ------------------------------------
def expect_error(capsys, tmp_path, pattern: str, *argv, out_should_exist: bool = False):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]
    if not out_should_exist:
        assert not (tmp_path / "idx").exists(), "a failed first build left a directory behind"


def test_bad_corpus_inputs(tmp_path, capsys):
    out = tmp_path / "idx"
    base = ("build-index", "--out", out, "--tokenizer", "bytes", "--stages", "tokenize")
    expect_error(capsys, tmp_path, "missing.jsonl: no such file", *base, "--corpus", tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    expect_error(capsys, tmp_path, "bad.jsonl:2: not valid JSON", *base, "--corpus", bad)
    notext = write_jsonl(tmp_path / "notext.jsonl", [{"text": "a"}, {"body": "b"}])
    expect_error(capsys, tmp_path, 'notext.jsonl:2: no "text" field', *base, "--corpus", notext)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  \n"}])
    expect_error(capsys, tmp_path, "no documents found in 1 file(s) (2 empty documents skipped)", *base,
                 "--corpus", empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    expect_error(capsys, tmp_path, "latin.txt:1: not UTF-8", *base, "--corpus", latin)
    unreadable = write_jsonl(tmp_path / "locked.jsonl", [{"text": "a"}])
    if os.geteuid() != 0:   # root reads anything
        unreadable.chmod(0)
        expect_error(capsys, tmp_path, "locked.jsonl: not readable", *base, "--corpus", unreadable)


def test_bad_options_and_out_dirs(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    out = tmp_path / "idx"
    expect_error(capsys, tmp_path, "--stages: unknown stage 'tokenise'", "build-index", "--corpus", corpus,
                 "--out", out, "--stages", "tokenise", "--tokenizer", "bytes")
    expect_error(capsys, tmp_path, "--workers 0: expected a positive number", "build-index", "--corpus", corpus,
                 "--out", out, "--workers", "0", "--tokenizer", "bytes")
    broken = tmp_path / "broken_tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text("{}")
    expect_error(capsys, tmp_path, f"--tokenizer {broken}: does not load", "build-index", "--corpus", corpus,
                 "--out", out, "--tokenizer", broken)
    expect_error(capsys, tmp_path, "--tokenizer nowhere: expected 'smollm2', 'bytes' or a local tokenizer",
                 "build-index", "--corpus", corpus, "--out", out, "--tokenizer", "nowhere")

    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    expect_error(capsys, tmp_path, "is not empty and holds no retrogram index", "build-index", "--corpus", corpus,
                 "--out", other, "--tokenizer", "bytes")
    assert (other / "thesis.tex").read_text() == "precious"

    assert run_cli(capsys, "build-index", "--corpus", corpus, "--out", out, "--tokenizer", "bytes",
                   "--stages", "tokenize")[0] == 0
    before = (out / "manifest.json").read_text()
    expect_error(capsys, tmp_path, "holds an index built with tokenizer 'bytes'", "build-index", "--corpus", corpus,
                 "--out", out, "--tokenizer", "smollm2", "--stages", "tokenize", out_should_exist=True)
    corpus2 = write_jsonl(tmp_path / "c2.jsonl", DOCS[:1])
    expect_error(capsys, tmp_path, "holds an index of another corpus", "build-index", "--corpus", corpus2,
                 "--out", out, "--tokenizer", "bytes", "--stages", "tokenize", out_should_exist=True)
    assert (out / "manifest.json").read_text() == before
    expect_error(capsys, tmp_path, "not a retrogram index", "info", other, out_should_exist=True)


def test_disk_full_leaves_nothing(tmp_path):
    """A file-size limit makes writes fail like a full disk: clear error, exit 2, no directory left."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "x" * 5000} for _ in range(200)])
    out = tmp_path / "idx"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run([*retrogram_command(), "build-index", "--corpus", str(corpus),
                           "--out", str(out), "--tokenizer", "bytes", "--stages", "tokenize", "--no-progress"],
                          preexec_fn=limit, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "disk full while running stage 'tokenize'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


# -- resume after a real kill --------------------------------------------------------------------------
def build_cmd(corpus: Path, out: Path, stages: str) -> list[str]:
    return [*retrogram_command(), "build-index", "--corpus", str(corpus), "--out",
            str(out), "--stages", stages, "--workers", "1", "--no-progress", "--json"]


def kill_when(cmd: list[str], marker: Path, timeout: float = 120) -> None:
    """Start the build and SIGKILL it as soon as `marker` exists (the stage is mid-way)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, "build finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def index_fingerprint(out: Path) -> dict:
    m = Manifest.load(out)
    rows = list(open_store(out).query("SELECT * FROM documents ORDER BY id"))
    return {"files": {k: v.files for k, v in m.stages.items()}, "tables": {k: v.tables for k, v in m.stages.items()},
            "rows": rows}


@pytest.fixture
def larger_corpus(tmp_path, demo_corpus) -> Path:
    """The demo corpus four times over (~5 MB): long enough to be killed mid-stage."""
    import gzip

    lines = gzip.open(demo_corpus, "rt", encoding="utf-8").read().splitlines()
    records = [dict(json.loads(line), id=f"{json.loads(line)['id']}-{k}") for k in range(4) for line in lines]
    return write_jsonl(tmp_path / "larger.jsonl", records)


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_index(tmp_path, larger_corpus):
    stages = "tokenize,ngram"
    ref = tmp_path / "ref"
    subprocess.run(build_cmd(larger_corpus, ref, stages), check=True, capture_output=True)

    out = tmp_path / "idx"
    kill_when(build_cmd(larger_corpus, out, stages), out / ".tmp-tokenize" / "tokens" / "tokens.bin")
    assert "tokenize" not in Manifest.load(out).stages            # the killed stage is not recorded
    kill_when(build_cmd(larger_corpus, out, stages), out / ".tmp-ngram")
    assert set(Manifest.load(out).stages) == {"tokenize"}         # the finished one is
    done = subprocess.run(build_cmd(larger_corpus, out, stages), check=True, capture_output=True, text=True)
    summary = json.loads(done.stdout)
    assert summary["skipped"] == ["tokenize"] and summary["ran"] == ["ngram"]
    assert index_fingerprint(out) == index_fingerprint(ref)
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())


def test_slow_tokenizer_directory_is_converted_once(tmp_path, capsys, monkeypatch):
    """A directory without tokenizer.json (a WordPiece vocab.txt) goes through transformers once."""
    monkeypatch.setenv("RETROGRAM_CACHE", str(tmp_path / "cache"))
    tok_dir = tmp_path / "wordpiece"
    tok_dir.mkdir()
    (tok_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "to", "be", "or",
                                                  "not", "that", "is", "the", "question"]) + "\n")
    (tok_dir / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "To be or not to be"}, {"text": "that is the question"}])
    out = tmp_path / "idx"
    code, stdout, err = run_cli(capsys, "build-index", "--corpus", corpus, "--out", out, "--tokenizer", tok_dir,
                                "--stages", "tokenize", "--json")
    assert code == 0, err
    stream = TokenStream.open(out)
    assert stream.tokens.dtype == np.uint8                       # 13 ids fit u8
    assert stream.doc(0).tolist() == [5, 6, 7, 8, 5, 6] and stream.doc(1).tolist() == [9, 10, 11, 12]
    assert load_index_tokenizer(out).decode(stream.doc(1)) == "that is the question"
