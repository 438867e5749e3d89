"""The build pipeline's registry and the stage protocol (run and append), as a package above index uses them:
the stages of index and ngram in pipeline order, the registry's rules, and a stage from outside index (as
retro's neighbours and encoded chunks will be) that joins build-index and --append through its own run
and append."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import retrogram.index.stages as stages_mod
from retrogram.index.append import append_documents
from retrogram.index.build import Stage, StageOutput, run_build
from retrogram.index.errors import UserError
from retrogram.index.stages import pipeline_stages, register_stage
from retrogram.ngram import pipeline_stages as ngram_pipeline_stages

LENGTHS = "lengths/lengths.bin"


def test_the_pipeline_has_every_imported_package_s_stages_in_order():
    names = [s.name for s in ngram_pipeline_stages()]
    assert names == ["tokenize", "ngram", "chunks", "embeddings", "faiss"]   # importing retrogram.ngram added ngram
    assert [s.name for s in pipeline_stages()] == names
    assert all(s.append is not None for s in ngram_pipeline_stages())


def test_registry_rules(monkeypatch):
    monkeypatch.setattr(stages_mod, "_REGISTRY", dict(stages_mod._REGISTRY))
    tokenize = next(s for s in pipeline_stages() if s.name == "tokenize")
    assert register_stage(tokenize) is tokenize   # again: no change
    with pytest.raises(ValueError, match="another stage of that name"):
        register_stage(dataclasses.replace(tokenize, summary="another"))
    with pytest.raises(ValueError, match="requires 'nope', which is not registered"):
        register_stage(Stage("x", ("nope",), lambda ctx: None, order=99))
    with pytest.raises(ValueError, match="must come after 'faiss'"):
        register_stage(Stage("x", ("faiss",), lambda ctx: None, order=45))
    assert "x" not in [s.name for s in pipeline_stages()]


# -- a stage from another package: every document's length in tokens, u64 [n_docs] --------------------------
def run_lengths(ctx):
    off = ctx.index.tokens.doc_offsets
    (ctx.tmp_dir / "lengths").mkdir()
    np.diff(off).astype(np.uint64).tofile(ctx.tmp_dir / LENGTHS)
    return StageOutput(counts={"documents": len(off) - 1})


def append_lengths(ctx):
    with open(ctx.index_dir / LENGTHS, "ab") as f:   # the journal truncates it back on failure
        f.write(np.diff(ctx.doc_offsets[ctx.doc_lo:]).astype(np.uint64).tobytes())
    ctx.record("lengths").counts["documents"] = len(ctx.doc_offsets) - 1
    ctx.refresh("lengths", [LENGTHS])


LENGTHS_STAGE = Stage("lengths", ("tokenize",), run_lengths, summary="documents -> their lengths",
                      append=append_lengths, order=60)


@pytest.fixture
def corpora(tmp_path, small_corpus):
    docs = [json.loads(line) for line in small_corpus.read_text().splitlines()]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({**r, "text": r["text"][:2000]}) + "\n" for r in docs[:2]))
    b.write_text("".join(json.dumps({**r, "text": r["text"][:3000]}) + "\n" for r in docs[2:]))
    return a, b


def test_a_stage_from_another_package_joins_build_and_append(monkeypatch, tmp_path, corpora):
    monkeypatch.setattr(stages_mod, "_REGISTRY", dict(stages_mod._REGISTRY))
    register_stage(LENGTHS_STAGE)
    assert [s.name for s in pipeline_stages()][-1] == "lengths"
    a, b = corpora
    wanted = ["tokenize", "ngram", "lengths"]
    full, inc = tmp_path / "full", tmp_path / "inc"
    run_build(full, [str(a), str(b)], "bytes", pipeline_stages(), wanted, options={"workers": 1})
    run_build(inc, [str(a)], "bytes", pipeline_stages(), wanted, options={"workers": 1})
    added = append_documents(inc, [str(b)])
    assert added["documents"] == 2 and added["chunks"] == 0 and added["ngram_shard"] == 1
    lengths = np.fromfile(inc / LENGTHS, dtype=np.uint64)
    assert np.array_equal(lengths, np.fromfile(full / LENGTHS, dtype=np.uint64))
    assert np.array_equal(lengths, np.diff(np.fromfile(inc / "tokens" / "doc_offsets.bin", dtype=np.uint64)))
    # its record was kept up to date: a build finds every stage current
    summary = run_build(inc, [str(a), str(b)], "bytes", pipeline_stages(), wanted, options={"workers": 1})
    assert summary.ran == [] and summary.counts["lengths"] == {"documents": 4}


def test_append_refuses_a_stage_it_cannot_run(monkeypatch, tmp_path, corpora):
    """Before anything is written: a stage that cannot append, and a stage no imported package provides."""
    monkeypatch.setattr(stages_mod, "_REGISTRY", dict(stages_mod._REGISTRY))
    register_stage(dataclasses.replace(LENGTHS_STAGE, append=None))
    a, b = corpora
    idx = tmp_path / "idx"
    run_build(idx, [str(a)], "bytes", pipeline_stages(), ["tokenize", "lengths"], options={"workers": 1})
    files = {str(p.relative_to(idx)): p.read_bytes() for p in idx.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="the 'lengths' stage cannot take new documents"):
        append_documents(idx, [str(b)])
    without = [s for s in pipeline_stages() if s.name != "lengths"]
    with pytest.raises(UserError, match="has the 'lengths' stage, which no imported package provides"):
        append_documents(idx, [str(b)], stages=without)
    assert {str(p.relative_to(idx)): p.read_bytes() for p in idx.rglob("*") if p.is_file()} == files
