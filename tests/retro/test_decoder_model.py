"""The decoder's forward (SDPA backend, CPU, float32) against transformers on tiny random models of every
supported architecture and RoPE scaling; packed mixed batches against each sequence alone; tree masks;
RoPE re-rotation; batch-1 generation against transformers' generate."""

from __future__ import annotations

import pytest
import torch

from retrogram.retro.attention import prepare_step
from retrogram.retro.config import ModelConfig, RopeScaling
from retrogram.retro.generate import CUDAGraphDecoder, decode_one_token, generate, greedy, prefill
from retrogram.retro.rope import apply_rope, inv_frequencies, rerotate_keys, rope_cos_sin
from retrogram.retro.weights import load_transformer

from decoder_helpers import hf_logits, hf_model, ours_from_hf, run_schedule

ATOL = 2e-5

VARIANTS = {
    "llama_tied_gqa": ModelConfig.tiny(),
    "llama_untied_mha_biases": ModelConfig.tiny(n_kv_heads=4, tie_word_embeddings=False, attention_bias=True,
                                                attention_out_bias=True, mlp_bias=True),
    "llama_gqa4": ModelConfig.tiny(n_heads=8, n_kv_heads=2, head_dim=8),
    "qwen2_biases": ModelConfig.tiny(model_type="qwen2", attention_bias=True, tie_word_embeddings=False),
    "mistral_head_dim": ModelConfig.tiny(model_type="mistral", head_dim=32, tie_word_embeddings=False),
    "rope_linear": ModelConfig.tiny(rope_scaling=RopeScaling(type="linear", factor=2.0)),
    "rope_llama3": ModelConfig.tiny(rope_theta=500000.0, rope_scaling=RopeScaling(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)),
    "rope_yarn": ModelConfig.tiny(rope_scaling=RopeScaling(type="yarn", factor=4.0,
                                                           original_max_position_embeddings=32)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_chunked_prefill_and_decode_match_transformers(name):
    cfg = VARIANTS[name]
    hf = hf_model(cfg)
    ours = ours_from_hf(hf)
    assert ours.config == cfg  # from_hf(to_hf(cfg)) round trip through transformers' config
    ids = torch.randint(0, cfg.vocab_size, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(hf, ids)
    # chunks of 16, 5, 16 then 8 single-token decode steps; 8-token pages: chunks cross page boundaries
    cache = ours.new_cache(num_pages=8, page_size=8)
    got = run_schedule(ours, cache, {"s": ids}, [[("s", 16)], [("s", 5)], [("s", 16)]] + [[("s", 1)]] * 8)["s"]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)


def test_loads_a_sharded_hf_directory(tmp_path):
    cfg = VARIANTS["qwen2_biases"]
    hf = hf_model(cfg, seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_transformer(tmp_path, backend="sdpa")
    ids = list(range(3, 30))
    cache = ours.new_cache(4, 16)
    got = run_schedule(ours, cache, {0: ids}, [[(0, len(ids))]])[0]
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=ATOL, rtol=1e-4)


def test_packed_mixed_batches_equal_each_sequence_alone_and_transformers():
    cfg = VARIANTS["llama_tied_gqa"]
    hf = hf_model(cfg, seed=2)
    ours = ours_from_hf(hf)
    g = torch.Generator().manual_seed(5)
    lens = {"a": 30, "b": 23, "c": 25, "d": 15}
    seqs = {s: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for s, n in lens.items()}
    # prefill chunks of various sizes beside decoding sequences; "b" ends early and "d" reuses its pages
    schedule = [
        [("a", 13), ("b", 5)],
        [("a", 1), ("b", 9), ("c", 11)],
        [("a", 1), ("b", 1), ("c", 6)],
        [("a", 7), ("b", 8), ("c", 1)],
        [("a", 1), ("c", 1)],
    ]
    cache = ours.new_cache(num_pages=12, page_size=8)
    got = run_schedule(ours, cache, {s: seqs[s] for s in "abc"}, schedule)
    assert cache.length("b") == 23
    b_pages = list(cache.pages["b"])
    cache.free("b")
    tail = [[("a", 1), ("c", 1), ("d", 12)], [("a", 1), ("d", 1)]]
    got2 = run_schedule(ours, cache, {s: seqs[s][cache.length(s):] for s in "acd"}, tail)
    assert set(cache.pages["d"]) & set(b_pages), "freed pages are reused by the next sequence"
    full = {s: torch.cat([got.get(s, torch.zeros(0, cfg.vocab_size)), got2.get(s, torch.zeros(0, cfg.vocab_size))])
            for s in "abcd"}
    for s in "abcd":
        n = full[s].shape[0]
        assert n > 0
        # the same sequence run alone through our forward, in one prefill
        alone_cache = ours.new_cache(num_pages=8, page_size=8)
        alone = run_schedule(ours, alone_cache, {s: seqs[s][:n]}, [[(s, n)]])[s]
        torch.testing.assert_close(full[s], alone, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(full[s], hf_logits(hf, seqs[s][:n]), atol=ATOL, rtol=1e-4)


def test_logits_at_selects_rows():
    cfg = ModelConfig.tiny()
    ours = ours_from_hf(hf_model(cfg))
    toks = torch.arange(5, 25)
    outs = []
    for rows in (None, torch.tensor([3, 19, 0])):
        cache = ours.new_cache(4, 8)
        batch, pos = prepare_step(cache, [0, 1], [12, 8])
        with torch.inference_mode():
            outs.append(ours(toks, pos, batch, cache, logits_at=rows))
    assert outs[1].shape == (3, cfg.vocab_size)
    torch.testing.assert_close(outs[1], outs[0][[3, 19, 0]])


def _tree_step(model, prefix, new, tree, positions):
    cache = model.new_cache(8, 8)
    run_schedule(model, cache, {0: prefix}, [[(0, len(prefix))]])
    batch, _ = prepare_step(cache, [0], [len(new)], tree_masks=[tree])
    with torch.inference_mode():
        return model(torch.tensor(new), torch.tensor(positions), batch, cache)


def test_tree_mask_causal_equals_plain_and_branches_do_not_see_siblings():
    cfg = ModelConfig.tiny()
    hf = hf_model(cfg, seed=4)
    ours = ours_from_hf(hf)
    prefix = list(range(10, 30))
    L = len(prefix)
    # a causal "tree" (a chain) is the plain causal step
    chain = [40, 41, 42, 43]
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    got = _tree_step(ours, prefix, chain, causal, list(range(L, L + 4)))
    torch.testing.assert_close(got, hf_logits(hf, prefix + chain)[L:], atol=ATOL, rtol=1e-4)
    # x with two children y1, y2 (both at position L + 1), and a grandchild z under y2
    x, y1, y2, z = 50, 51, 52, 53
    tree = torch.tensor([[1, 0, 0, 0],
                         [1, 1, 0, 0],
                         [1, 0, 1, 0],
                         [1, 0, 1, 1]], dtype=torch.bool)
    got = _tree_step(ours, prefix, [x, y1, y2, z], tree, [L, L + 1, L + 1, L + 2])
    ref1 = hf_logits(hf, prefix + [x, y1])
    ref2 = hf_logits(hf, prefix + [x, y2, z])
    torch.testing.assert_close(got[0], ref1[L], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got[1], ref1[L + 1], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got[2], ref2[L + 1], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got[3], ref2[L + 2], atol=ATOL, rtol=1e-4)
    # the sibling matters: without the mask y2 would see y1
    plain = _tree_step(ours, prefix, [x, y1, y2, z], causal, [L, L + 1, L + 1, L + 2])
    assert not torch.allclose(plain[2], got[2], atol=1e-3)


def test_bad_tree_mask_is_refused():
    cfg = ModelConfig.tiny()
    cache = ours_from_hf(hf_model(cfg)).new_cache(2, 8)
    with pytest.raises(ValueError, match="tree_mask"):
        prepare_step(cache, [0], [3], tree_masks=[torch.ones(2, 2, dtype=torch.bool)])
    with pytest.raises(ValueError, match="diagonal"):
        prepare_step(cache, [0], [2], tree_masks=[torch.zeros(2, 2, dtype=torch.bool)])
    assert cache.length(0) == 0


SCALINGS = [RopeScaling(), RopeScaling(type="linear", factor=3.0),
            RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=64),
            RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=64),
            RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.5,
                        beta_fast=16.0, truncate=False)]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s.type)
def test_inv_frequencies_match_transformers(scaling):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig.tiny(head_dim=32, rope_scaling=scaling, rope_theta=50000.0)
    inv, att = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    hfc = AutoConfig.for_model(**cfg.to_hf())
    if scaling.type == "default":
        ref = 1.0 / (cfg.rope_theta ** (torch.arange(0, 32, 2).float() / 32))
        ref_att = 1.0
    else:
        ref, ref_att = ROPE_INIT_FUNCTIONS[scaling.type](hfc, "cpu")
    torch.testing.assert_close(inv, ref.float(), rtol=1e-6, atol=0)
    assert att == pytest.approx(ref_att)


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s.type)
def test_rerotating_keys_equals_rotating_at_the_new_position(scaling):
    inv, att = inv_frequencies(32, 10000.0, scaling, 512)
    k = torch.randn(20, 3, 32, dtype=torch.float64).float()
    p = torch.randint(0, 300, (20,))
    q = torch.randint(0, 300, (20,))
    at_p = apply_rope(k, *rope_cos_sin(inv, p, att))
    at_q = apply_rope(k, *rope_cos_sin(inv, q, att))
    moved = rerotate_keys(at_p, p, q, inv)
    torch.testing.assert_close(moved, at_q, atol=5e-5, rtol=1e-5)
    assert not torch.allclose(at_p, at_q, atol=1e-2)  # the move is not a no-op


def test_generate_greedy_matches_transformers_generate():
    cfg = ModelConfig.tiny(eos_token_ids=(255,))
    hf = hf_model(cfg, seed=7)
    ours = ours_from_hf(hf)
    prompt = [1, 17, 33, 90, 4, 5]
    got = list(generate(ours, None, prompt, max_new_tokens=20, page_size=8))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=255,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref
    assert len(set(got)) > 2  # a real continuation, not one repeated token


def test_generate_stops_at_a_stop_token_and_frees_its_cache():
    cfg = ModelConfig.tiny()
    ours = ours_from_hf(hf_model(cfg, seed=7))
    prompt = [1, 17, 33, 90]
    free_run = list(generate(ours, None, prompt, max_new_tokens=12, stop_token_ids=[]))
    stop = free_run[5]
    first = free_run.index(stop)
    got = list(generate(ours, None, prompt, max_new_tokens=12, stop_token_ids=[stop]))
    assert got == free_run[:first + 1]
    cache = ours.new_cache(4, 16)
    list(generate(ours, None, prompt, max_new_tokens=3, cache=cache, seq="x", stop_token_ids=[]))
    assert cache.length("x") == len(prompt) + 2  # the last sampled token is not fed back


def test_prefill_in_chunks_equals_one_shot_and_decode_steps():
    cfg = ModelConfig.tiny()
    ours = ours_from_hf(hf_model(cfg, seed=8))
    toks = list(range(40, 80))
    c1, c2 = ours.new_cache(8, 8), ours.new_cache(8, 8)
    a = prefill(ours, c1, 0, toks, chunk_size=None)
    b = prefill(ours, c2, 0, toks, chunk_size=7)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(decode_one_token(ours, c1, 0, 5), decode_one_token(ours, c2, 0, torch.tensor(5)),
                               atol=ATOL, rtol=1e-4)


def test_static_decode_step_equals_decode_one_token():
    # the CUDA-graph decoder's static-buffer step, run eagerly on the CPU
    cfg = ModelConfig.tiny()
    ours = ours_from_hf(hf_model(cfg, seed=9))
    prompt = list(range(3, 14))
    c1, c2 = ours.new_cache(8, 8), ours.new_cache(8, 8)
    l1, l2 = prefill(ours, c1, 0, prompt), prefill(ours, c2, 0, prompt)
    dec = CUDAGraphDecoder(ours, c2, 0, max_seqlen=40)
    for _ in range(12):  # crosses page boundaries (8-token pages)
        t1, t2 = greedy(l1[None]), greedy(l2[None])
        assert int(t1) == int(t2)
        l1 = decode_one_token(ours, c1, 0, t1)
        l2 = dec.step(t2).clone()
        torch.testing.assert_close(l1, l2, atol=ATOL, rtol=1e-4)
    assert c1.length(0) == c2.length(0) == len(prompt) + 12
