"""The embeddings stage resumes in the middle: a real build killed with SIGKILL continues from the last
finished batch and ends with the same embeddings as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from retrogram.index.stages.embeddings import PARTIAL_DIR, chunk_texts, load_embeddings
from retrogram.services.launch import retrogram_command


def _cmd(corpus, out):
    return [*retrogram_command(), "build-index", "--corpus", str(corpus), "--out",
            str(out), "--stages", "embeddings", "--embed-batch-tokens", "384", "--workers", "1", "--no-progress",
            "--json", "--device", "cpu"]


def test_killed_embedding_build_resumes(tmp_path, small_corpus):
    corpus = tmp_path / "c.jsonl"
    lines = small_corpus.read_text().splitlines()[:2]
    corpus.write_text("\n".join(json.dumps({**json.loads(l), "text": json.loads(l)["text"][:5000]})
                                for l in lines) + "\n")
    out = tmp_path / "idx"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(_cmd(corpus, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = out / PARTIAL_DIR / "progress.json"
    done = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = json.loads(progress.read_text())["batches_done"]
        except (OSError, ValueError):
            done = 0
        if done >= 2:
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail(f"the build ended before it could be killed: {proc.communicate()[1].decode()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(progress.read_text())["batches_done"]
    assert killed_at >= 2
    assert "embeddings" not in json.loads((out / "manifest.json").read_text())["stages"]

    r = subprocess.run(_cmd(corpus, out), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["ran"] == ["embeddings"] and set(summary["skipped"]) >= {"tokenize", "chunks"}
    counts = summary["counts"]["embeddings"]
    assert counts["resumed_at_batch"] == killed_at
    assert 0 < counts["embedded_now"] < counts["chunks"]
    assert not (out / PARTIAL_DIR).exists()

    # same vectors as one uninterrupted pass with the same batches
    from retrogram.index.stages.chunks import ChunkTable
    from retrogram.index.embedder import Embedder

    emb, cfg = load_embeddings(out)
    texts = chunk_texts(out, ChunkTable.open(out))
    ref = Embedder.load(device="cpu", batch_tokens=384).encode(texts).astype(np.float16)
    assert emb.shape == ref.shape and cfg["embedder"]["name"] == "all-MiniLM-L6-v2"
    assert np.abs(emb.astype(np.float32) - ref.astype(np.float32)).max() < 2e-3
    assert (np.abs(np.linalg.norm(emb.astype(np.float32), axis=1) - 1) < 1e-2).all()
