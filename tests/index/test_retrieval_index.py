"""FAISS build/search, the torch exact path, the Retriever and the retrieve/neighbours CLI, each against
brute-force search over the stored embeddings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from retrogram.index.stages.chunks import ChunkTable
from retrogram.index.stages.embeddings import load_embeddings
from retrogram.index.errors import IndexFormatError, UserError
from retrogram.index.search import exact_search
from retrogram.index.search.faiss import FaissSearcher
from retrogram.index.stages.faiss import choose_factory, make_index, train_and_add
from retrogram.index.search.torch_exact import TorchExactSearcher


def _build(out, corpus, stages, **options):
    from retrogram.index.build import run_build
    from retrogram.ngram import pipeline_stages

    run_build(out, [str(corpus)], None, pipeline_stages(), stages, options={"workers": 1, **options})
    return out


@pytest.fixture(scope="module")
def ridx(tmp_path_factory, small_corpus):
    """small_corpus (4 Shakespeare documents, ~390 chunks) through tokenize, chunks, embeddings, faiss (Flat)."""
    return _build(tmp_path_factory.mktemp("ridx") / "idx", small_corpus, ["faiss"])


@pytest.fixture(scope="module")
def retriever(ridx):
    from retrogram.index import Retriever

    return Retriever.open(ridx, backend="faiss")


def _sets(ids):
    return [set(r[r >= 0].tolist()) for r in ids]


# -- faiss / torch search ------------------------------------------------------------------------------
def test_factory_choice():
    assert choose_factory(1000, 384) == "Flat"
    assert choose_factory(1_000_000, 384) == "HNSW32,Flat"
    assert choose_factory(5_000_000, 384).startswith("IVF") and choose_factory(5_000_000, 384).endswith(",SQ8")
    with pytest.raises(UserError, match="--faiss-factory"):
        make_index("NotAFactory99", 384)


def test_flat_matches_brute_force(ridx):
    emb, _ = load_embeddings(ridx)
    s = FaissSearcher.open(ridx)
    q = np.asarray(emb[::37], dtype=np.float32) + 0.01
    got, ref = s.search(q, 5), exact_search(emb, q, 5)
    assert np.allclose(got.scores, ref.scores, atol=1e-4)
    assert _sets(got.ids) == _sets(ref.ids)


@pytest.mark.parametrize("factory", ["IVF8,SQ8", "HNSW16,Flat", "PCA96,IVF8,SQ8"])
def test_approximate_with_rerank_and_exclusions(ridx, factory):
    emb, _ = load_embeddings(ridx)
    t = ChunkTable.open(ridx)
    index = make_index(factory, emb.shape[1])
    train_and_add(index, emb)
    meta = {"exact": False, "nprobe": 8, "ef_search": 128, "rerank": 8}
    s = FaissSearcher(index, meta, emb)
    q = np.asarray(emb[5::29], dtype=np.float32)
    excl = [(t.doc_range(int(t.doc_ids[i])),) for i in range(5, len(emb), 29)]
    got, ref = s.search(q, 4, excl), exact_search(emb, q, 4, excl)
    recall = np.mean([len(a & b) / 4 for a, b in zip(_sets(got.ids), _sets(ref.ids))])
    assert recall >= 0.9
    for row, ranges in zip(got.ids, excl):   # exclusion is exact whatever the index
        for lo, hi in ranges:
            assert not ((row >= lo) & (row < hi)).any()
    # re-ranked scores are exact inner products
    valid = got.ids >= 0
    recomputed = np.einsum("md,mkd->mk", q, np.asarray(emb[np.where(valid, got.ids, 0)], dtype=np.float32))
    assert np.allclose(got.scores[valid], recomputed[valid], atol=1e-4)


def test_torch_exact_matches_brute_force_with_ranges(ridx):
    emb, _ = load_embeddings(ridx)
    ts = TorchExactSearcher(emb, device="cpu", block=50)   # many blocks
    q = np.asarray(emb[::41], dtype=np.float32)
    excl = [((0, 30), (100, 160)) if i % 2 else ((i, i + 1),) for i in range(len(q))]
    got, ref = ts.search(q, 6, excl), exact_search(emb, q, 6, excl)
    assert np.allclose(got.scores, ref.scores, atol=1e-4)
    assert _sets(got.ids) == _sets(ref.ids)


def test_faiss_file_must_match_chunk_table(ridx, tmp_path):
    import faiss

    bad = tmp_path / "idx"
    shutil.copytree(ridx, bad)
    index = faiss.read_index(str(bad / "retrieval/faiss.index"))
    index.remove_ids(np.arange(3, dtype=np.int64))
    faiss.write_index(index, str(bad / "retrieval/faiss.index"))
    with pytest.raises(IndexFormatError, match="faiss.index"):
        FaissSearcher.open(bad)


# -- Retriever -----------------------------------------------------------------------------------------
def test_retrieve_text_matches_brute_force(retriever, ridx):
    emb, _ = load_embeddings(ridx)
    queries = ["Is the king dead?", "I love thee more than words can wield the matter"]
    res = retriever.search(queries, k=3)
    q = retriever.embed(queries)
    ref = exact_search(emb, q, 3)
    for ns, ids, scores in zip(res, ref.ids, ref.scores):
        assert [n.chunk_id for n in ns] == ids.tolist()
        assert np.allclose([n.score for n in ns], scores, atol=1e-4)
    n = res[0][0]
    t = ChunkTable.open(ridx)
    assert n.tokens == t.tokens(n.chunk_id).tolist() and n.continuation == t.continuation(n.chunk_id).tolist()
    assert n.text == retriever.tokenizer.decode(n.tokens)
    assert n.document["external_id"] and n.document["metadata"]["collection"]
    json.dumps(n.to_dict())


def test_queries_by_tokens_and_embedding_agree(retriever):
    text = "Good night, sweet prince"
    ids = retriever.tokenizer.encode(text)
    by_text = retriever.search(text, k=2)[0]
    by_tokens = retriever.search_tokens(ids, k=2)[0]
    by_emb = retriever.search_embeddings(retriever.embed(text)[0], k=2)[0]
    assert [n.chunk_id for n in by_text] == [n.chunk_id for n in by_tokens] == [n.chunk_id for n in by_emb]


def test_exclude_doc(retriever):
    first = retriever.search("the king", k=4)[0]
    d = first[0].doc_id
    res = retriever.search(["the king", "the king"], k=4, exclude_doc=[d, None])
    assert all(n.doc_id != d for n in res[0])
    assert [n.chunk_id for n in res[1]] == [n.chunk_id for n in first]
    res = retriever.search("the king", k=4, exclude_docs=[0, 1, 2])
    assert all(n.doc_id == 3 for n in res[0])


def test_bad_input(retriever, tmp_path):
    with pytest.raises(UserError, match="k 0"):
        retriever.search("x", k=0)
    with pytest.raises(UserError, match="larger than the index"):
        retriever.search("x", k=retriever.n_chunks + 1)
    with pytest.raises(UserError, match="empty text"):
        retriever.search(["ok", "  "])
    with pytest.raises(UserError, match="embeddings"):
        retriever.search_embeddings(np.zeros((2, 100), np.float32))
    with pytest.raises(UserError, match="token_ids"):
        retriever.search_tokens([[]])
    with pytest.raises(UserError, match="exclude_doc 99"):
        retriever.search("x", exclude_doc=99)
    with pytest.raises(UserError, match="exclude_doc: 1 entries for 2"):
        retriever.search(["a", "b"], exclude_doc=[1])
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="--embedder"):
        from retrogram.index import Retriever

        Retriever.open(retriever.index_dir, embedder=str(other))


def test_precompute_neighbours_excludes_own_document(retriever, ridx, tmp_path):
    info = retriever.precompute_neighbours(tmp_path / "nb.npz", k=3, batch=50)
    d = np.load(tmp_path / "nb.npz")
    emb, _ = load_embeddings(ridx)
    t = ChunkTable.open(ridx)
    excl = [(t.doc_range(int(doc)),) for doc in t.doc_ids]
    ref = exact_search(emb, np.asarray(emb, np.float32), 3, excl)
    assert info["chunks"] == len(t) and d["ids"].shape == (len(t), 3)
    assert np.allclose(d["scores"], ref.scores, atol=1e-4)
    assert (t.doc_ids[d["ids"]] != t.doc_ids[:, None]).all()


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_retrieve_and_neighbours(ridx, tmp_path, capsys):
    from retrogram.services.cli import main

    assert main(["retrieve", "--index", str(ridx), "--k", "2", "--json", "what is honour?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["query"] == "what is honour?" and len(out[0]["neighbours"]) == 2
    assert main(["retrieve", "--index", str(ridx), "--k", "0", "x"]) == 2
    assert "k 0" in capsys.readouterr().err
    assert main(["neighbours", "--index", str(ridx), "--out", str(tmp_path / "n.npz"), "--k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["k"] == 2
    assert main(["neighbours", "--index", str(ridx), "--out", str(tmp_path / "n.npy"), "--k", "2", "--json"]) == 0
    capsys.readouterr()
    assert np.array_equal(np.load(tmp_path / "n.npy"), np.load(tmp_path / "n.npz")["ids"])
    assert main(["neighbours", "--index", str(ridx), "--out", str(tmp_path / "n.txt")]) == 2


def test_threaded_rerank_is_exact(ridx, monkeypatch):
    """The re-ranking runs in blocks on a thread pool (faiss's thread count): the same exact scores and order as
    brute force over the shortlist, whatever the block size or thread count, with -1 holes in the shortlist."""
    import faiss

    from retrogram.index.search import faiss as fi

    emb, _ = load_embeddings(ridx)
    s = FaissSearcher(make_index("Flat", emb.shape[1]), {"exact": False, "rerank": 4}, emb, gpu=False)
    rng = np.random.default_rng(3)
    q = np.asarray(emb[rng.choice(len(emb), 50, replace=False)], dtype=np.float32) + 0.01
    shortlist = rng.integers(0, len(emb), (50, 12))
    shortlist[rng.random(shortlist.shape) < 0.2] = -1
    shortlist[7] = -1                       # a query with nothing to re-rank
    ref_s = np.einsum("md,mkd->mk", q, np.asarray(emb[np.where(shortlist >= 0, shortlist, 0)], dtype=np.float32))
    ref_s[shortlist < 0] = -np.inf
    old = faiss.omp_get_max_threads()
    try:
        for threads, block in ((1, 32), (3, 4), (4, 1)):
            faiss.omp_set_num_threads(threads)
            monkeypatch.setattr(fi, "RERANK_BLOCK", block)
            got_s, got_i = s._rerank(q, shortlist, 5)
            for r in range(len(q)):
                want = np.sort(ref_s[r])[::-1][:5]
                assert np.allclose(got_s[r], want, atol=1e-5)
                for sc, i in zip(got_s[r], got_i[r]):
                    if np.isfinite(sc):
                        assert i >= 0 and np.isclose(ref_s[r][list(shortlist[r]).index(i)], sc, atol=1e-5)
                    else:
                        assert i == -1
            assert (got_i[7] == -1).all()
    finally:
        faiss.omp_set_num_threads(old)
