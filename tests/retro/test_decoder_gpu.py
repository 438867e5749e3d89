"""The decoder on a real GPU: the Triton path in bf16 against SDPA on a SmolLM2-shaped random model, and the
CUDA-graph decode step (dense and HiP graphs) against eager steps.

Under the `gpu` marker; they skip without CUDA and under Triton's interpreter: run them as
`TRITON_INTERPRET=0 pytest -m gpu tests/retro`."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import decoder_helpers as helpers

from retrogram.retro.attention import TritonOptions, prepare_step
from retrogram.retro.config import ModelConfig
from retrogram.retro.generate import CUDAGraphDecoder, decode_one_token, generate, prefill
from retrogram.retro.model import Transformer
from retrogram.kernels.testing import rel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="Triton's interpreter is on in this process: run TRITON_INTERPRET=0 pytest -m gpu"),
]

# SmolLM2-135M's attention shape (9 query / 3 KV heads of 64), fewer layers
CFG = ModelConfig.tiny(vocab_size=1024, dim=576, n_layers=4, n_heads=9, n_kv_heads=3, head_dim=64,
                       intermediate_size=1536, max_position_embeddings=8192)


def random_model(dtype, seed=0) -> Transformer:
    return helpers.random_model(CFG, "cuda", dtype, seed, scale=0.05, norm_scale=0.1)


def test_triton_matches_sdpa_in_bf16_over_mixed_steps():
    model = random_model(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    seqs = {s: torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for s, n in
            {"a": 700, "b": 300, "c": 90}.items()}
    schedule = [[("a", 500), ("b", 100)], [("a", 1), ("b", 150), ("c", 80)], [("a", 1), ("b", 1), ("c", 1)],
                [("a", 190), ("b", 1), ("c", 1)], [("a", 1), ("b", 1)]]
    outs = []
    for backend in ("sdpa", "triton"):
        model.set_backend(backend)
        cache = model.new_cache(num_pages=40, page_size=64)
        done = {s: 0 for s in seqs}
        per_step = []
        for step in schedule:
            toks = torch.cat([torch.tensor(seqs[s][done[s]:done[s] + n]) for s, n in step]).cuda()
            batch, pos = prepare_step(cache, [s for s, _ in step], [n for _, n in step])
            with torch.inference_mode():
                per_step.append(model(toks, pos, batch, cache))
            for s, n in step:
                done[s] += n
        outs.append(torch.cat(per_step))
    assert rel(outs[1], outs[0]) < 2e-2


@pytest.mark.parametrize("sparse_from", [None, 600])
def test_cuda_graph_decode_equals_eager_steps(sparse_from):
    model = random_model(torch.float32, seed=2)
    opts = TritonOptions() if sparse_from is None else TritonOptions(sparse_decode_from=sparse_from)
    model.set_backend("triton", opts)
    prompt = torch.randint(0, CFG.vocab_size, (580,), generator=torch.Generator().manual_seed(3)).tolist()
    c1 = model.new_cache(20, 64)
    logits0 = prefill(model, c1, 0, prompt)
    c2 = copy.deepcopy(c1)
    dec = CUDAGraphDecoder(model, c2, 0, max_seqlen=1024)
    tokens = torch.randint(0, CFG.vocab_size, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    for t in tokens:  # crosses the 640-token page boundary and, for the HiP case, the switch at 600
        eager = decode_one_token(model, c1, 0, t)
        graph = dec.step(torch.tensor(t, device="cuda")).clone()
        assert rel(graph, eager) < 1e-3
    assert set(dec._graphs) == ({False} if sparse_from is None else {False, True})
    assert torch.isfinite(logits0).all()


def test_generate_with_and_without_cuda_graph():
    model = random_model(torch.float32, seed=5).set_backend("triton")
    prompt = list(range(1, 200))
    eager = list(generate(model, None, prompt, 24, cuda_graph=False, stop_token_ids=[]))
    graph = list(generate(model, None, prompt, 24, cuda_graph=True, stop_token_ids=[]))
    # random weights: near-ties may flip late tokens, so compare the first stretch
    assert eager[:8] == graph[:8]


def test_generate_graphs_kept_between_calls_match_eager():
    # the runner kept on the model (prefill graph + decode graph over its own cache) gives the tokens of the eager
    # path, call after call, at prompt lengths that hit different prefill buckets; the unfused setting drops it
    model = random_model(torch.float32, seed=3)
    model.set_backend("triton")
    g = torch.Generator().manual_seed(2)
    for n in (5, 64, 300, 5):
        prompt = torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist()
        eager = list(generate(model, None, prompt, 24, stop_token_ids=(), cuda_graph=False))
        graphs = list(generate(model, None, prompt, 24, stop_token_ids=()))
        assert graphs == eager, n
    runner = model._graph_runner
    assert not runner.busy and runner.cache.free_pages == runner.cache.num_pages
    model.set_backend("triton", fused=False)
    assert list(generate(model, None, prompt, 24, stop_token_ids=())) == eager
    assert model._graph_runner is not runner
