"""`retrogram demo`: the README's main job, end to end (build, queries, retrieval, the gRPC stack, generation)."""

from __future__ import annotations

import json
import subprocess

from retrogram.services.launch import retrogram_command


def test_demo_end_to_end_on_a_small_corpus(tmp_path, small_corpus):
    out = tmp_path / "demo-index"
    proc = subprocess.run([*retrogram_command(), "demo", "--corpus", str(small_corpus),
                           "--out", str(out), "--json"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["build"]["ran"] == ["tokenize", "ngram", "chunks", "embeddings", "faiss"]
    ngram = report["ngram"]
    scored = ngram["infgram_prob_per_token"]
    assert len(scored["prob"]) == len(scored["suffix_len"]) > 5
    assert all(0 <= p <= 1 for p in scored["prob"]) and max(scored["prob"]) > 0
    assert len(report["retrieve"]["neighbours"]) == 2
    grpc = report["grpc"]
    assert grpc["match"] is True and grpc["counts"] == ngram["counts"]
    answer = grpc["answer"]   # generated through the DecoderService
    assert answer["text"].strip() and 0 < answer["usage"]["completion_tokens"] <= 48
