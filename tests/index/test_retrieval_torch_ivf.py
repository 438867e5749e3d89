"""TorchIVFSearcher (IVF in torch, vectors streamed from host memory in chunks of a GPU memory budget)
against faiss's own IVF search at the same nprobe and against exact search at nprobe = nlist (CPU torch)."""

from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from retrogram.index.search import exact_search  # noqa: E402
from retrogram.index.stages.faiss import make_index, train_and_add  # noqa: E402
from retrogram.index.search.torch_ivf import TorchIVFSearcher  # noqa: E402


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 32)).astype(np.float32)
    x = centers[rng.integers(0, 20, 3000)] + 0.6 * rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = x.astype(np.float16)
    index = make_index("IVF16,Flat", 32)
    train_and_add(index, emb)
    q = centers[rng.integers(0, 20, 40)] + 0.6 * rng.standard_normal((40, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return emb, index, q


def _sets(ids):
    return [set(r[r >= 0].tolist()) for r in ids]


@pytest.mark.parametrize("nprobe", [1, 3])
def test_matches_faiss_ivf_at_same_nprobe(data, nprobe):
    emb, index, q = data
    # 8 KiB budget: chunks of ~17 rows -> well over 100 chunks per batch
    ts = TorchIVFSearcher.from_faiss(index, emb, nprobe=nprobe, device="cpu", max_gpu_bytes=8 << 10, merge_gap=4)
    assert ts.chunk_rows < 30
    got = ts.search(q, 8)
    D, I = index.search(q, 8, params=faiss.SearchParametersIVF(nprobe=nprobe))
    assert _sets(got.ids) == _sets(I)
    valid = I >= 0
    assert np.allclose(np.sort(got.scores[valid]), np.sort(D[valid]), atol=1e-4)


def test_all_lists_is_exact_with_exclusions(data):
    emb, index, q = data
    ts = TorchIVFSearcher.from_faiss(index, emb, nprobe=16, device="cpu", max_gpu_bytes=8 << 10)
    excl = [((0, 500), (1000, 1200)) if i % 2 else ((i * 10, i * 10 + 50),) for i in range(len(q))]
    for ex in (None, excl):
        got, ref = ts.search(q, 6, ex), exact_search(emb, q, 6, ex)
        assert _sets(got.ids) == _sets(ref.ids)
        assert np.allclose(got.scores, ref.scores, atol=1e-4)
    for row, ranges in zip(got.ids, excl):
        for lo, hi in ranges:
            assert not ((row >= lo) & (row < hi)).any()


def test_from_assignment_and_budget_independence(data):
    emb, index, q = data
    ivf = faiss.extract_index_ivf(index)
    cent = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    _, assign = ivf.quantizer.search(np.asarray(emb, np.float32), 1)
    small = TorchIVFSearcher.from_assignment(emb, cent, assign[:, 0], nprobe=2, device="cpu", max_gpu_bytes=4 << 10)
    big = TorchIVFSearcher.from_assignment(emb, cent, assign[:, 0], nprobe=2, device="cpu")
    a, b = small.search(q, 5), big.search(q, 5)
    assert _sets(a.ids) == _sets(b.ids)
    assert np.allclose(a.scores, b.scores, atol=1e-5)


def test_retriever_torch_ivf_backend(tmp_path_factory, small_corpus):
    from retrogram.index import Retriever
    from retrogram.index.build import run_build
    from retrogram.index.stages.embeddings import load_embeddings
    from retrogram.ngram import pipeline_stages

    out = tmp_path_factory.mktemp("ivfidx") / "idx"
    run_build(out, [str(small_corpus)], None, pipeline_stages(), ["faiss"],
              options={"workers": 1, "faiss_factory": "IVF8,Flat"})
    r = Retriever.open(out, backend="torch-ivf", nprobe=8, device="cpu")
    assert isinstance(r.searcher, TorchIVFSearcher)
    emb, _ = load_embeddings(out)
    q = np.asarray(emb[3::50], dtype=np.float32)
    got = r.search_ids(q, 4, exclude_doc=0)
    ref = exact_search(emb, q, 4, r._exclusions(len(q), 0, None))
    assert _sets(got.ids) == _sets(ref.ids)
