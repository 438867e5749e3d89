"""`build-index --append` against a fresh build of all the documents: same token stream, chunks, store rows,
embeddings, exact search results and n-gram counts (the new documents as one extra n-gram shard)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from retrogram.index.stages.chunks import ChunkTable
from retrogram.index.stages.embeddings import load_embeddings
from retrogram.index.errors import UserError
from retrogram.index.search import exact_search
from retrogram.index.search.faiss import FaissSearcher
from retrogram.index.store import open_store
from retrogram.index.stages.tokenize import TokenStream
from retrogram.ngram import pipeline_stages

STAGES = ["tokenize", "ngram", "chunks", "embeddings", "faiss"]


def _build(out, corpora, **options):
    from retrogram.index.build import run_build

    return run_build(out, [str(c) for c in corpora], None, pipeline_stages(), STAGES,
                     options={"workers": 1, **options})


@pytest.fixture(scope="module")
def parts(tmp_path_factory, small_corpus):
    d = tmp_path_factory.mktemp("append")
    lines = small_corpus.read_text().splitlines()
    cut = [json.dumps({**json.loads(l), "text": json.loads(l)["text"][:6000]}) for l in lines]
    (d / "a.jsonl").write_text("\n".join(cut[:2]) + "\n")
    (d / "b.jsonl").write_text("\n".join(cut[2:]) + "\n")
    return d, d / "a.jsonl", d / "b.jsonl"


def test_append_equals_full_build(parts):
    from retrogram.index.append import append_documents
    from retrogram.ngram.engine import Engine

    d, a, b = parts
    full, inc = d / "full", d / "inc"
    _build(full, [a, b])
    _build(inc, [a])
    before = Engine(inc).get_num_shards()
    added = append_documents(inc, [str(b)])
    assert added["documents"] == 2 and added["chunks"] > 0 and added["ngram_shard"] == before

    fs, is_ = TokenStream.open(full), TokenStream.open(inc)
    assert np.array_equal(fs.doc_offsets, is_.doc_offsets) and np.array_equal(fs.tokens, is_.tokens)
    ft, it = ChunkTable.open(full), ChunkTable.open(inc)
    assert np.array_equal(np.asarray(ft.rows), np.asarray(it.rows))
    q = "SELECT id, source, external_id, token_offset, token_len, metadata FROM documents ORDER BY id"
    assert list(open_store(full).query(q)) == list(open_store(inc).query(q))
    q = "SELECT * FROM chunks ORDER BY id"
    assert list(open_store(full).query(q)) == list(open_store(inc).query(q))
    fe, _ = load_embeddings(full)
    ie, _ = load_embeddings(inc)
    assert np.abs(fe.astype(np.float32) - ie.astype(np.float32)).max() < 2e-2   # other batches, same model
    s = FaissSearcher.open(inc)
    qv = np.asarray(ie[::7], dtype=np.float32)
    got, ref = s.search(qv, 5), exact_search(ie, qv, 5)
    assert np.allclose(got.scores, ref.scores, atol=1e-4)
    # n-gram counts: the appended shard adds up to the full build's
    fe_ng, ie_ng = Engine(full), Engine(inc)
    assert ie_ng.get_num_shards() == before + 1
    tokens = np.asarray(fs.tokens)
    rng = np.random.default_rng(0)
    for _ in range(20):
        i, n = int(rng.integers(0, len(tokens) - 5)), int(rng.integers(1, 5))
        ids = tokens[i:i + n].tolist()
        assert ie_ng.count(ids)["count"] == fe_ng.count(ids)["count"]
    # the build sees every stage up to date afterwards (manifest files and tables consistent)
    summary = _build(inc, [a, b])
    assert summary.ran == [] and set(summary.skipped) == set(STAGES)


def test_append_bad_input_leaves_index_unchanged(parts, tmp_path):
    from retrogram.index.append import append_documents

    d, a, b = parts
    idx = d / "inc2"
    _build(idx, [a], )
    manifest = (idx / "manifest.json").read_text()
    sizes = {p.name: p.stat().st_size for p in idx.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already in the index"):
        append_documents(idx, [str(a)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError):
        append_documents(idx, [str(bad)])
    with pytest.raises(UserError, match="--faiss-factory"):
        append_documents(idx, [str(b)], {"faiss_factory": "HNSW32,Flat"})
    assert (idx / "manifest.json").read_text() == manifest
    assert {p.name: p.stat().st_size for p in idx.rglob("*") if p.is_file()} == sizes


def _state(idx) -> tuple:
    """What an undone append must leave as it was: the manifest, every file's size, the store's row counts."""
    return ((idx / "manifest.json").read_text(),
            {str(p.relative_to(idx)): p.stat().st_size for p in idx.rglob("*") if p.is_file()},
            (open_store(idx)["documents"].count, open_store(idx)["chunks"].count))


def test_append_failure_midway_rolls_back(parts):
    import retrogram.index.append as ap

    d, a, b = parts
    idx = d / "inc3"
    _build(idx, [a])
    before = _state(idx)

    def boom(*args, **kw):
        raise RuntimeError("disk on fire")

    # the faiss stage's append fails: after tokens, store rows, the n-gram shard, chunks and embeddings
    stages = [dataclasses.replace(s, append=boom) if s.name == "faiss" else s for s in pipeline_stages()]
    with pytest.raises(RuntimeError, match="disk on fire"):
        ap.append_documents(idx, [str(b)], stages=stages)
    assert _state(idx) == before
    assert not (idx / ap.JOURNAL).exists()
    assert _build(idx, [a]).ran == []


def test_a_kill_after_any_stage_is_rolled_back(parts, monkeypatch):
    """Every stage's part of an append is undone: the append dies right after one stage appended (each stage
    in turn, the later ones not run), leaving its journal as a killed process does, and rollback_append
    puts back every file (appended, created, replaced), table row and the manifest."""
    import retrogram.index.append as ap

    d, a, b = parts
    idx = d / "inc4"
    _build(idx, [a])
    before = _state(idx)
    rollback = ap.rollback_append
    monkeypatch.setattr(ap, "rollback_append", lambda index_dir: False)   # a killed process undoes nothing

    class Killed(BaseException):
        pass

    def then_die(append):
        def f(ctx):
            append(ctx)
            raise Killed

        return f

    for name in STAGES:
        stages = [dataclasses.replace(s, append=then_die(s.append)) if s.name == name else s for s in pipeline_stages()]
        with pytest.raises(Killed):
            ap.append_documents(idx, [str(b)], stages=stages)
        assert (idx / ap.JOURNAL).is_file()
        assert (idx / "tokens" / "tokens.bin").stat().st_size > before[1]["tokens/tokens.bin"]   # appended, not undone
        assert rollback(idx)
        assert _state(idx) == before, name
    assert _build(idx, [a]).ran == []


def test_cli_append_errors(parts, capsys):
    from retrogram.services.cli import main

    d, a, b = parts
    idx = d / "inc2"   # built by test_append_bad_input_leaves_index_unchanged, or now
    if not (idx / "manifest.json").is_file():
        _build(idx, [a])
    assert main(["build-index", "--corpus", str(a), "--out", str(idx), "--append", "--json"]) == 2
    assert "already in the index" in capsys.readouterr().err
    assert main(["build-index", "--corpus", str(b), "--out", str(idx), "--append", "--force"]) == 2
    assert "--append and --force" in capsys.readouterr().err
