"""`Index`: one handle on an index directory. Its manifest is read once however many readers open the index
(Retriever.open read it six times before the handle), each part is opened once and shared, and a missing
stage or file is named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retrogram.index import Index, Retriever
from retrogram.index.errors import IndexFormatError
from retrogram.index.manifest import Manifest
from retrogram.index.stages.chunks import ChunkTable
from retrogram.index.stages.tokenize import TokenStream
from retrogram.ngram import Engine


@pytest.fixture(scope="module")
def full_index(tmp_path_factory, small_corpus):
    """Every stage (bytes tokenizer: a small, fast index) over the first 3000 characters of each document."""
    from retrogram.index.build import run_build
    from retrogram.ngram import pipeline_stages

    d = tmp_path_factory.mktemp("handle")
    lines = [json.loads(line) for line in small_corpus.read_text().splitlines()]
    corpus = d / "c.jsonl"
    corpus.write_text("".join(json.dumps({**r, "text": r["text"][:3000]}) + "\n" for r in lines))
    run_build(d / "idx", [str(corpus)], "bytes", pipeline_stages(), None, options={"workers": 1})
    return d / "idx"


@pytest.fixture
def manifest_loads(monkeypatch):
    """A list that counts Manifest.load calls from here on."""
    calls = []
    load = Manifest.load.__func__

    def counting(cls, index_dir):
        calls.append(str(index_dir))
        return load(cls, index_dir)

    monkeypatch.setattr(Manifest, "load", classmethod(counting))
    return calls


def test_opening_reads_the_manifest_once(full_index, manifest_loads):
    r = Retriever.open(full_index, backend="faiss")
    r.tokenizer, r.document(0)
    assert len(manifest_loads) == 1
    manifest_loads.clear()
    e = Engine(full_index)
    e.tokenizer, e.get_document(0)
    assert len(manifest_loads) == 1
    # one handle for everything: one read in all
    manifest_loads.clear()
    index = Index.open(full_index)
    r, e = Retriever.open(index, backend="faiss"), Engine(index)
    index.tokens, index.chunks, index.embeddings, index.store, e.tokenizer, r.tokenizer
    TokenStream.open(index), ChunkTable.open(index)
    assert len(manifest_loads) == 1


def test_the_parts_are_opened_once_and_shared(full_index):
    index = Index.open(full_index)
    r, e = Retriever.open(index, backend="faiss"), Engine(index)
    assert r.index is index and e.indexes == [index]
    assert r.table is index.chunks and r.table.stream is index.tokens
    assert r.tokenizer is index.tokenizer is e.tokenizer
    assert r.emb is index.embeddings
    assert r.searcher is index.searcher("faiss")
    # what the handle serves is what the files hold
    off = np.fromfile(full_index / "tokens" / "doc_offsets.bin", dtype=np.uint64)
    assert np.array_equal(index.tokens.doc_offsets, off)
    assert np.array_equal(index.tokens.tokens, np.fromfile(full_index / "tokens" / "tokens.bin", dtype=np.uint8))
    assert index.embeddings.shape == (len(index.chunks), index.embeddings_config["dim"])
    assert r.search_embeddings(np.asarray(index.embeddings[:3], np.float32), k=1)[0][0].chunk_id == 0
    assert e.get_doc_by_ix(1, 10**6)["token_ids"] == index.tokens.doc(1).tolist()


def test_missing_parts_are_named(full_index, tmp_path):
    with pytest.raises(IndexFormatError, match="manifest.json: missing"):
        Index.open(tmp_path)
    with pytest.raises(IndexFormatError, match="no such index directory"):
        Index.open(tmp_path / "nope")
    copy = tmp_path / "copy"
    shutil.copytree(full_index, copy)
    m = Manifest.load(copy)
    del m.stages["faiss"]
    m.save(copy)
    index = Index.open(copy)
    assert index.has("embeddings") and not index.has("faiss")
    with pytest.raises(IndexFormatError, match=r"no 'faiss' stage .* --stages faiss"):
        index.searcher()
    with pytest.raises(IndexFormatError, match=r"no 'faiss' stage"):
        Retriever.open(index)
    with open(copy / "chunks" / "chunks.bin", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(IndexFormatError, match=r"chunks\.bin: truncated or changed"):
        Index.open(copy).chunks


def test_servicers_take_an_index(full_index, manifest_loads):
    """The gRPC servicers open their index once for check() and load() (a path), or take an open Index."""
    from retrogram.services.ngram_service import NgramServicer
    from retrogram.services.retriever_service import RetrieverServicer

    for svc in (NgramServicer(full_index), RetrieverServicer(full_index, device="cpu")):
        manifest_loads.clear()
        svc.check()
        svc.load()
        assert len(manifest_loads) == 1 and svc.describe() == str(full_index)
    index = Index.open(full_index)
    manifest_loads.clear()
    ng, rt = NgramServicer(index), RetrieverServicer(index, device="cpu")
    for svc in (ng, rt):
        svc.check()
        svc.load()
        assert svc.describe() == str(full_index)
    assert manifest_loads == [] and ng.engine.indexes == [index] and rt.retriever.index is index
    assert rt.Info(None, None).num_documents == ng.Info(None, None).num_documents == index.tokens.n_docs
