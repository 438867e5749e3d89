"""The paged KV cache's allocator and addressing, and the clear errors for bad configs, checkpoints and
tokenizers."""

from __future__ import annotations

import json

import pytest
import torch

from retrogram.index.errors import UserError
from retrogram.retro.attention import prepare_step
from retrogram.retro.config import ModelConfig, UnsupportedModelError
from retrogram.retro.kv_cache import CacheFull, KVCache, page_bytes, pages_for_budget
from retrogram.retro.weights import WeightsError, load_model, load_transformer

from decoder_helpers import hf_model


def test_allocate_free_reuse_and_truncate():
    cfg = ModelConfig.tiny()
    c = KVCache(cfg, num_pages=6, page_size=4)
    assert c.k.shape == (cfg.n_layers, 6, 4, cfg.n_kv_heads, cfg.head_dim)
    c.allocate("a", 5)              # 2 pages
    assert len(c.pages["a"]) == 2 and c.length("a") == 0 and c.free_pages == 4
    c.advance("a", 5)
    c.allocate("a", 3)              # 8 tokens fit the 2 pages
    assert len(c.pages["a"]) == 2
    c.allocate("a", 4)              # 9 tokens: a third page
    assert len(c.pages["a"]) == 3
    with pytest.raises(ValueError, match="allocate first"):
        c.advance("a", 8)
    c.allocate("b", 12)
    assert c.free_pages == 0
    with pytest.raises(CacheFull, match="'c' needs 1 more pages, 0 of 6 free") as e:
        c.allocate("c", 1)
    assert (e.value.needed, e.value.free) == (1, 0)
    assert "c" not in c.pages       # nothing allocated by the failed call
    b_pages = list(c.pages["b"])
    c.free("b")
    assert c.free_pages == 3 and "b" not in c.lengths
    c.allocate("c", 10)             # reuses b's pages, the last freed first
    assert sorted(c.pages["c"]) == sorted(b_pages)
    c.advance("a", 7)               # a: 12 tokens in 3 pages
    c.truncate("a", 5)              # back to 2 pages
    assert c.length("a") == 5 and len(c.pages["a"]) == 2 and c.free_pages == 1
    with pytest.raises(ValueError, match="cannot truncate"):
        c.truncate("a", 6)


def test_block_table_and_slot_mapping_address_the_right_rows():
    cfg = ModelConfig.tiny()
    c = KVCache(cfg, num_pages=8, page_size=4)
    c.allocate("x", 3)
    c.allocate("y", 9)
    c.advance("y", 9)
    c.allocate("x", 9)  # x's later pages come after y's
    c.advance("x", 9)
    table = c.block_table(["x", "y"], max_pages=4)
    assert table.dtype == torch.int32 and table.shape == (2, 4)
    assert table[0, :3].tolist() == c.pages["x"] and table[0, 3] == 0
    slots = c.slot_mapping(["x", "y"], [2, 7], [3, 2])
    px, py = c.pages["x"], c.pages["y"]
    assert slots.tolist() == [px[0] * 4 + 2, px[0] * 4 + 3, px[1] * 4 + 0, py[1] * 4 + 3, py[2] * 4 + 0]
    with pytest.raises(ValueError, match="max_pages"):
        c.block_table(["x"], max_pages=2)
    # write / gather round trip through the pages
    k = torch.randn(9, cfg.n_kv_heads, cfg.head_dim)
    v = torch.randn(9, cfg.n_kv_heads, cfg.head_dim)
    c.write(1, c.slots("x", 0, 9), k, v)
    gk, gv = c.gather(1, "x")
    assert torch.equal(gk, k) and torch.equal(gv, v)
    assert torch.equal(c.k[1, px[2], 0], k[8])
    assert not c.k[0].any()  # other layers untouched


def test_budget_sizing():
    cfg = ModelConfig.tiny()  # 2 layers, 2 KV heads x 16
    assert page_bytes(cfg, 16, torch.bfloat16) == 2 * 2 * 16 * 2 * 16 * 2
    assert pages_for_budget(cfg, 10 * 4096 + 4095, 16, torch.bfloat16) == 10
    assert pages_for_budget(cfg, 10 * 8192, 16, torch.float32) == 10
    c = KVCache.for_budget(cfg, 5 * 8192, 16, torch.float32)
    assert c.num_pages == 5 and c.nbytes() <= 5 * 8192
    with pytest.raises(ValueError, match="holds no page"):
        KVCache.for_budget(cfg, 100, 16)


def test_prepare_step_is_all_or_nothing():
    cfg = ModelConfig.tiny()
    c = KVCache(cfg, num_pages=4, page_size=4)
    prepare_step(c, ["a"], [6])
    with pytest.raises(CacheFull) as e:
        prepare_step(c, ["a", "b", "c"], [1, 4, 5])  # a fits its pages, b takes 1 of 2 free, c needs 2
    assert e.value.seq == "c"
    assert c.length("a") == 6 and "b" not in c.pages and c.free_pages == 2
    batch, pos = prepare_step(c, ["a", "b"], [2, 3])
    assert pos.tolist() == [6, 7, 0, 1, 2]
    assert batch.seqlens.tolist() == [8, 3] and batch.cu_seqlens.tolist() == [0, 2, 5]
    assert batch.max_seqlen_k == 8 and batch.max_seqlen_q == 3
    with pytest.raises(ValueError, match="twice"):
        prepare_step(c, ["a", "a"], [1, 1])


# ---- bad configs -------------------------------------------------------------------------------------------

def _hf_cfg(**over):
    cfg = ModelConfig.tiny().to_hf()
    cfg.update(over)
    return cfg


def test_unsupported_model_type_names_it_and_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2' .*llama, qwen2, mistral"):
        ModelConfig.from_hf(_hf_cfg(model_type="gpt2", architectures=["GPT2LMHeadModel"]))


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported; supported: default, linear, llama3, yarn"),
    ({"type": "longrope", "factor": 2.0}, "'longrope' is not supported"),
    ({"rope_type": "linear"}, "needs a positive 'factor'"),
])
def test_unsupported_rope_scaling_is_refused(rope, match):
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_hf(_hf_cfg(rope_scaling=rope, rope_parameters=None))


def test_sliding_window_shorter_than_the_context_is_refused():
    with pytest.raises(UnsupportedModelError, match="sliding_window 128 is shorter than max_position_embeddings 512"):
        ModelConfig.from_hf(_hf_cfg(model_type="mistral", sliding_window=128))
    # a window covering the context is plain causal attention; qwen2 applies it only with use_sliding_window
    assert ModelConfig.from_hf(_hf_cfg(model_type="mistral", sliding_window=512)).model_type == "mistral"
    assert ModelConfig.from_hf(_hf_cfg(model_type="qwen2", sliding_window=128, use_sliding_window=False))
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        ModelConfig.from_hf(_hf_cfg(model_type="qwen2", sliding_window=128, use_sliding_window=True,
                                    max_window_layers=0))


def test_other_config_errors():
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu'"):
        ModelConfig.from_hf(_hf_cfg(hidden_act="gelu"))
    cfg = _hf_cfg()
    del cfg["intermediate_size"]
    with pytest.raises(UserError, match="missing 'intermediate_size'"):
        ModelConfig.from_hf(cfg)
    with pytest.raises(UserError, match="multiple of n_kv_heads"):
        ModelConfig.tiny(n_heads=4, n_kv_heads=3)


# ---- bad checkpoints ------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_dir(tmp_path):
    hf = hf_model(ModelConfig.tiny(tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _rewrite(model_dir, fn):
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


def test_loading_a_good_directory_works(tiny_dir):
    m = load_transformer(tiny_dir)
    assert m.config.n_layers == 2 and not m.config.tie_word_embeddings
    assert m.output.weight.data_ptr() != m.tok_embeddings.weight.data_ptr()


def test_not_a_directory_and_missing_paths(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="not a directory"):
        load_transformer(f)
    with pytest.raises(UserError, match="no such file or directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        load_transformer(tmp_path)


def test_unsupported_architecture_directory(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="model_type 'falcon'"):
        load_transformer(tiny_dir)


def test_nan_weight_is_named(tiny_dir):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    _rewrite(tiny_dir, poison)
    with pytest.raises(WeightsError, match=r"model.layers.1.mlp.up_proj.weight has 1 NaN or infinite"):
        load_transformer(tiny_dir)


def test_missing_and_misshaped_tensors_are_named(tiny_dir):
    _rewrite(tiny_dir, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensors model.layers.0.self_attn.k_proj.weight"):
        load_transformer(tiny_dir)

    def bad_shape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    _rewrite(tiny_dir, bad_shape)
    with pytest.raises(WeightsError, match=r"k_proj.weight has shape \[16, 64\], expected \[32, 64\]"):
        load_transformer(tiny_dir)


def test_unexpected_tensors_and_no_safetensors(tiny_dir):
    def extra(t):
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    _rewrite(tiny_dir, extra)
    with pytest.raises(WeightsError, match="unexpected tensors model.layers.0.self_attn.q_norm.weight"):
        load_transformer(tiny_dir)
    (tiny_dir / "model.safetensors").rename(tiny_dir / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"no \*.safetensors weights \(found pytorch_model.bin"):
        load_transformer(tiny_dir)


# ---- tokenizers -------------------------------------------------------------------------------------------

def test_check_index_tokenizer(tmp_path):
    from retrogram.index.manifest import Manifest
    from retrogram.index.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_identity
    from retrogram.retro.weights import check_index_tokenizer, model_tokenizer_identity

    tok = load_tokenizer("smollm2")
    # an index records the identity of its own copy of the tokenizer (build.py saves it, then hashes it)
    same, other = tmp_path / "same", tmp_path / "other"
    tok.save(same / "tokenizer")
    Manifest(tokenizer=tokenizer_identity(tok, same / "tokenizer"), corpus=[]).save(same)
    ByteTokenizer().save(other / "tokenizer")
    Manifest(tokenizer=tokenizer_identity(ByteTokenizer(), other / "tokenizer"), corpus=[]).save(other)
    assert check_index_tokenizer(same, tok) == model_tokenizer_identity(tok)
    with pytest.raises(UserError, match=r"built with tokenizer 'bytes' .*the model's tokenizer is 'smollm2'"):
        check_index_tokenizer(other, tok)
    with pytest.raises(UserError, match="not a retrogram index"):
        check_index_tokenizer(tmp_path, tok)


def test_a_tokenizer_larger_than_the_vocab_is_refused(tiny_dir):
    from retrogram.index.tokenizer import load_tokenizer

    load_tokenizer("smollm2").save(tiny_dir)
    with pytest.raises(UserError, match="49152 tokens, more than the model's vocab_size 256"):
        load_model(tiny_dir)
