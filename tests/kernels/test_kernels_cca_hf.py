"""CCA against its reference, and the transformers registration on a tiny random Llama
(CPU: Triton interpreter, float32)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

import pytest  # noqa: E402
import torch  # noqa: E402

from retrogram.kernels.cca_attention import cca_attention, cca_attention_naive  # noqa: E402

from retrogram.kernels.testing import DEV  # noqa: E402


@pytest.mark.parametrize("B,T,C,L,N,HQ,HKV", [(2, 50, 16, 4, 24, 4, 2), (1, 64, 16, 4, 8, 2, 2), (2, 10, 16, 2, 20, 3, 1)])
def test_cca_matches_reference(B, T, C, L, N, HQ, HKV):
    q = torch.randn(B, T, HQ, 32, device=DEV)
    k, v = torch.randn(B, L, N, HKV, 32, device=DEV), torch.randn(B, L, N, HKV, 32, device=DEV)
    out = torch.full_like(q, float("nan"))
    o = cca_attention(q, k, v, C, out=out)
    ref = cca_attention_naive(q.double(), k.double(), v.double(), C)
    assert o is out and not torch.isnan(o).any()
    assert ((o.double() - ref).norm() / ref.norm()).item() < 1e-4


def test_cca_needs_enough_chunks():
    with pytest.raises(ValueError, match="neighbour chunks"):
        cca_attention(torch.randn(1, 40, 2, 16), torch.randn(1, 2, 8, 2, 16), torch.randn(1, 2, 8, 2, 16), 16)


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    from retrogram.kernels.hf import register

    # sparse paths forced on short sequences, but with budgets that keep every block: results must
    # equal dense attention, so generation must equal SDPA's
    register(hip=dict(dense_below=0, block_size_q=16, block_size_k=16, topk=16, n_local=2, refresh_every=3),
             vs=dict(dense_below=0, block_size_q=16, block_size_k=16, n_vertical=16, n_slash=16, last_q=8))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["triton_dense", "triton_hip", "triton_vs"])
def test_hf_greedy_generation_matches_sdpa(tiny_llama, impl):
    ids = torch.randint(0, 128, (1, 70))
    outs = {}
    for name in ("sdpa", impl):
        tiny_llama.set_attn_implementation(name)
        with torch.no_grad():
            outs[name] = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                             do_sample=False, pad_token_id=0)
    assert torch.equal(outs["sdpa"], outs[impl])
    if impl == "triton_hip":
        # the decode selection was made, then reused and refreshed every 3 steps
        states = [m._retrogram_hip for m in tiny_llama.modules() if getattr(m, "_retrogram_hip", None)]
        assert states and all(1 <= s["step"] <= 3 for s in states)


def test_hf_padding_matches_sdpa(tiny_llama):
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    logits = {}
    for name in ("sdpa", "triton_dense"):
        tiny_llama.set_attn_implementation(name)
        with torch.no_grad():
            logits[name] = tiny_llama(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.allclose(logits["sdpa"][keep], logits["triton_dense"][keep], atol=1e-4)
