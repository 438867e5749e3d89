"""The decoder's Triton attention path against its SDPA path (CPU: the Triton interpreter, float32): prefill
chunks with and without a cached prefix (flash_prefill varlen, bottom-right causal), paged decode
(flash_decode), HiP sparse decode/prefill wiring, tree-masked rows, and the CUDA-graph decoder's static step."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

import torch  # noqa: E402

from retrogram.kernels.hf import HIP_DEFAULTS  # noqa: E402
from retrogram.retro.attention import TritonOptions, prepare_step  # noqa: E402
from retrogram.retro.config import ModelConfig  # noqa: E402
from retrogram.retro.generate import CUDAGraphDecoder, decode_one_token, prefill  # noqa: E402
from retrogram.retro.graphs import PrefillGraphs  # noqa: E402
from retrogram.retro.model import Transformer  # noqa: E402
from retrogram.kernels.testing import rel  # noqa: E402

import decoder_helpers as helpers  # noqa: E402
from decoder_helpers import run_schedule  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"
# float32 everywhere; on a GPU the kernels' dots run in tf32
TOL = 1e-5 if DEV == "cpu" else 5e-3


def random_model(cfg: ModelConfig, seed=0) -> Transformer:
    return helpers.random_model(cfg, DEV, seed=seed)


def both(model, schedule, seqs, page_size, opts=None, tree=None):
    """Run the schedule with each backend on its own cache; per-sequence logits of each."""
    out = []
    for backend in ("sdpa", "triton"):
        model.set_backend(backend, opts)
        cache = model.new_cache(num_pages=24, page_size=page_size)
        out.append(run_schedule(model, cache, seqs, schedule))
    return out


def _seqs(cfg, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for s, n in lens.items()}


def test_mixed_steps_match_sdpa():
    cfg = ModelConfig.tiny(n_heads=6, n_kv_heads=2)  # GQA 3, head dim 16
    model = random_model(cfg)
    seqs = _seqs(cfg, {"a": 40, "b": 30, "c": 20})
    schedule = [
        [("a", 21), ("b", 6)],                 # prefill without a prefix
        [("a", 1), ("b", 13), ("c", 9)],       # a decodes, b appends a chunk to its cache, c starts
        [("a", 1), ("b", 1), ("c", 1)],        # decode only (flash_decode over the pages)
        [("a", 11), ("c", 1)],                 # a chunk after decode steps
    ]
    ref, got = both(model, schedule, seqs, 8)  # 8-token pages: every step crosses pages
    for s in seqs:
        assert got[s].shape == ref[s].shape
        assert rel(got[s], ref[s]) < TOL, s


def test_tree_masked_rows_beside_kernel_rows():
    cfg = ModelConfig.tiny()
    model = random_model(cfg, seed=1)
    seqs = _seqs(cfg, {"p": 20, "d": 12, "t": 19}, seed=1)
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    outs = []
    for backend in ("sdpa", "triton"):
        model.set_backend(backend)
        cache = model.new_cache(16, 8)
        run_schedule(model, cache, {"d": seqs["d"][:11], "t": seqs["t"][:16]}, [[("d", 11), ("t", 16)]])
        batch, pos = prepare_step(cache, ["p", "d", "t"], [20, 1, 3], tree_masks=[None, None, tree])
        pos[-3:] = torch.tensor([16, 17, 17])
        toks = torch.tensor(seqs["p"] + seqs["d"][11:12] + seqs["t"][16:19], device=DEV)
        with torch.inference_mode():
            outs.append(model(toks, pos, batch, cache))
    assert rel(outs[1], outs[0]) < TOL


def hip(**over):
    return {**HIP_DEFAULTS, **over}


def _decode_from(model, cache, seqs, steps, backend, opts=None):
    """Decode steps (each sequence one token) from a copy of a prefilled cache."""
    model.set_backend(backend, opts)
    cache = copy.deepcopy(cache)
    done = {s: cache.length(s) for s in seqs}
    out = []
    for _ in range(steps):
        batch, pos = prepare_step(cache, list(seqs), [1] * len(seqs))
        toks = torch.tensor([seqs[s][done[s]] for s in seqs], device=DEV)
        with torch.inference_mode():
            out.append(model(toks, pos, batch, cache))
        done = {s: d + 1 for s, d in done.items()}
    return torch.stack(out)


def test_hip_decode_wiring():
    cfg = ModelConfig.tiny(n_layers=1)
    model = random_model(cfg, seed=2)
    seqs = _seqs(cfg, {"a": 75, "b": 70}, seed=2)
    model.set_backend("sdpa")
    cache = model.new_cache(24, 16)
    run_schedule(model, cache, {"a": seqs["a"][:72], "b": seqs["b"][:66]}, [[("a", 72), ("b", 66)]])
    ref = _decode_from(model, cache, seqs, 2, "sdpa")
    # sink + top-k + local blocks cover every 8-token block: HiP decode keeps all keys, equals dense
    every = TritonOptions(sparse_decode_from=1, hip=hip(block_size_k=8, topk=8, n_sink=1, n_local=1))
    assert rel(_decode_from(model, cache, seqs, 2, "triton", every), ref) < TOL
    # one selected block of eight: a different (sparse) result, so the HiP path really ran
    few = TritonOptions(sparse_decode_from=1, hip=hip(block_size_k=8, topk=1, n_sink=1, n_local=1))
    assert rel(_decode_from(model, cache, seqs, 2, "triton", few), ref) > 1e-3
    # below the switch the dense kernel runs: equal again
    off = TritonOptions(sparse_decode_from=1000, hip=few.hip)
    assert rel(_decode_from(model, cache, seqs, 2, "triton", off), ref) < TOL


def test_hip_prefill_wiring():
    cfg = ModelConfig.tiny(n_layers=1)
    model = random_model(cfg, seed=3)
    seqs = _seqs(cfg, {"a": 100}, seed=3)
    schedule = [[("a", 36)], [("a", 64)]]  # the second chunk has a 36-token prefix
    model.set_backend("sdpa")
    ref = run_schedule(model, model.new_cache(8, 16), seqs, schedule)["a"]
    small = dict(block_size_q=16, block_size_k=16, n_sink=1, n_local=1, sample_rows=16)
    # top-p 1: every block with any attention mass kept, equals dense
    model.set_backend("triton", TritonOptions(sparse_prefill_from=1, hip=hip(top_p=1.0, **small)))
    got = run_schedule(model, model.new_cache(8, 16), seqs, schedule)["a"]
    assert rel(got, ref) < TOL
    model.set_backend("triton", TritonOptions(sparse_prefill_from=1, hip=hip(top_p=0.3, **small)))
    got2 = run_schedule(model, model.new_cache(8, 16), seqs, schedule)["a"]
    assert rel(got2[36:], ref[36:]) > 1e-3


def test_static_decode_step_on_the_kernel_path():
    # exactly what CUDAGraphDecoder captures (no host lengths, fixed max_seqlen bound), run eagerly
    cfg = ModelConfig.tiny()
    model = random_model(cfg, seed=4)
    prompt = list(range(7, 30))
    model.set_backend("sdpa")
    c1 = model.new_cache(8, 16)
    ref = [prefill(model, c1, 0, prompt)]
    for t in (5, 6, 7, 8, 9, 10, 11, 12, 13, 14):
        ref.append(decode_one_token(model, c1, 0, t))
    model.set_backend("triton")
    c2 = model.new_cache(8, 16)
    got = [prefill(model, c2, 0, prompt)]
    dec = CUDAGraphDecoder(model, c2, 0, max_seqlen=64)
    for t in (5, 6, 7, 8, 9, 10, 11, 12, 13, 14):  # crosses a page boundary at 32
        got.append(dec.step(torch.tensor(t, device=DEV)).clone())
        assert dec.batch.q_lens is None
    assert rel(torch.stack(got), torch.stack(ref)) < TOL


def test_static_prefill_padded_to_a_bucket():
    # what PrefillGraphs captures, run eagerly: the prompt padded to a bucket (padding writes no K/V and is
    # never attended), logits at the last real token; the cache then holds exactly the prompt
    cfg = ModelConfig.tiny()
    model = random_model(cfg, seed=5)
    model.set_backend("sdpa")
    for n in (1, 23, 64, 70):
        prompt = list(range(3, 3 + n))
        c1 = model.new_cache(8, 16)
        model.set_backend("sdpa")
        ref = [prefill(model, c1, 0, prompt)] + [decode_one_token(model, c1, 0, t) for t in (5, 6)]
        model.set_backend("triton")
        c2 = model.new_cache(8, 16)
        c2.k.fill_(float("nan")), c2.v.fill_(float("nan"))   # a slot written by padding would show
        graphs = PrefillGraphs(model, c2, max_tokens=128)
        assert graphs.fits(c2, 0, n)
        got = [graphs.prefill(0, torch.tensor(prompt, device=DEV)).clone()]
        assert c2.length(0) == n
        used = c2.slots(0, 0, n).to(c2.device)
        assert not c2.k[0].view(-1, cfg.n_kv_heads, cfg.head_dim)[used].isnan().any()
        written = ~c2.k[0].view(-1, cfg.n_kv_heads, cfg.head_dim).isnan().all(-1).all(-1)
        assert int(written.sum()) == n                       # nothing past the prompt
        got += [decode_one_token(model, c2, 0, t) for t in (5, 6)]
        assert rel(torch.stack(got), torch.stack(ref)) < TOL, n
        assert not graphs.fits(c2, 0, 3)                     # not a fresh sequence any more
    model.set_backend("triton", fused=False)   # the padding's skipped writes are the fused kernel's
    c3 = model.new_cache(8, 16)
    assert not PrefillGraphs(model, c3).fits(c3, 0, 3)
