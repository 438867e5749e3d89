"""Continuous batching (retro/scheduler.py) against the batch-1 reference (retro/generate.py): the same
tokens whatever else shares the steps, chunked prefill, pages returned, admission by cache room, the
queue bound, cancellation, bad requests, and live ∞-gram interpolation against the engine itself."""

from __future__ import annotations

import pytest
import torch
from ngram_fixtures import engine_fixture, ngram_index_fixture  # noqa: F401
from retrogram.index.tokenizer import ByteTokenizer
from retrogram.retro.config import ModelConfig
from retrogram.retro.generate import generate
from retrogram.retro.model import Transformer
from retrogram.retro.sampling import SamplingParams, sample
from retrogram.retro.scheduler import QueueFull, RequestError, Scheduler


def tiny_model(vocab_size: int = 256, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.tiny(vocab_size=vocab_size, eos_token_ids=(2,))).eval()
    with torch.no_grad():   # weights large enough that the argmax depends on the context
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def reference(model, prompt, params: SamplingParams) -> list[int]:
    """The batch-1 generator with the scheduler's sampler: the tokens a request must get."""
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    out = []
    for t in generate(model, None, prompt, params.max_tokens,
                      sample_fn=lambda lg: sample(lg, [params], [gen], [torch.tensor(prompt + out)]).tokens,
                      stop_token_ids=()):
        out.append(t)   # noqa: PERF402 (the sampler reads `out` as it grows)
    return out


def outputs(sched: Scheduler, reqs) -> dict:
    events = sched.run()
    got = {r.id: [] for r in reqs}
    for ev in events:
        got[ev.request.id] += ev.token_ids
    return got


@pytest.mark.parametrize("graphs", [False, True])
def test_batched_requests_get_the_tokens_they_get_alone(graphs):
    model = tiny_model()
    cache = model.new_cache(64, page_size=8)
    # step_tokens 12: prompts of up to 39 tokens prefill in chunks beside the running decodes
    sched = Scheduler(model, ByteTokenizer(), cache, max_running=4, step_tokens=12, cuda_graphs=graphs,
                      eos_token_id=None)
    ps = prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=9), SamplingParams(temperature=0.8, seed=5, max_tokens=7),
              SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=7, max_tokens=11),
              SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=8),
              SamplingParams(temperature=0.7, seed=11, max_tokens=5), SamplingParams(temperature=0, max_tokens=6)]
    reqs = [sched.add(p, q) for p, q in zip(ps, params)]
    got = outputs(sched, reqs)
    for r, p, q in zip(reqs, ps, params):
        assert got[r.id] == reference(model, p, q), r.id
        assert r.finish_reason == "length" and len(r.output_ids) == q.max_tokens
    assert cache.free_pages == sched.cache_pages == 64 - graphs   # every page back (but the graphs' scratch page)
    assert sched.steps > sum(q.max_tokens for q in params) / 4   # it really batched: fewer steps than tokens


def test_requests_arriving_while_others_decode():
    model = tiny_model(seed=3)
    sched = Scheduler(model, ByteTokenizer(), model.new_cache(64, page_size=8), max_running=3, step_tokens=8,
                      eos_token_id=None)
    ps, reqs, got = prompts(5, seed=4), [], {}
    q = SamplingParams(temperature=0, max_tokens=6)
    for p in ps:                               # one new request every two steps
        reqs.append(sched.add(p, q))
        for _ in range(2):
            for ev in sched.step():
                got.setdefault(ev.request.id, []).extend(ev.token_ids)
    for ev in sched.run():
        got.setdefault(ev.request.id, []).extend(ev.token_ids)
    for r, p in zip(reqs, ps):
        assert got[r.id] == reference(model, p, q)


def test_admission_waits_for_cache_room_and_pages_come_back():
    model = tiny_model()
    cache = model.new_cache(4, page_size=8)    # 32 tokens: one request of 20 + 10 at a time
    sched = Scheduler(model, ByteTokenizer(), cache, max_running=4, eos_token_id=None)
    q = SamplingParams(temperature=0, max_tokens=10)
    ps = [p[:20] + [5] * (20 - len(p[:20])) for p in prompts(3, seed=9)]
    reqs = [sched.add(p, q) for p in ps]
    first = sched.step()
    assert len(sched.running) == 1 and len(sched.waiting) == 2
    got = outputs(sched, reqs)
    got[reqs[0].id] = first[0].token_ids + got[reqs[0].id]
    assert [got[r.id] for r in reqs] == [reference(model, p, q) for p in ps]
    assert reqs[2].queued_steps >= 2 * q.max_tokens - 1 and cache.free_pages == 4


def test_cancel_frees_pages_within_a_step():
    model = tiny_model()
    cache = model.new_cache(16, page_size=8)
    sched = Scheduler(model, ByteTokenizer(), cache, eos_token_id=None)
    a = sched.add(prompts(1)[0], SamplingParams(temperature=0, max_tokens=50))
    b = sched.add([7, 8, 9], SamplingParams(temperature=0, max_tokens=5))
    for _ in range(3):
        sched.step()
    assert cache.pages.get(a.id)
    sched.cancel(a)
    events = sched.step()
    assert a.finish_reason == "cancelled" and a.id not in cache.pages
    assert any(e.request is a and e.finish_reason == "cancelled" for e in events)
    sched.run()
    assert b.finish_reason == "length" and cache.free_pages == 16


def test_queue_bound_and_bad_requests():
    model = tiny_model()
    sched = Scheduler(model, ByteTokenizer(), model.new_cache(8, page_size=8), max_running=1, max_waiting=2,
                      max_context=48)
    ok = SamplingParams(temperature=0, max_tokens=4)
    sched.add([5, 6], ok), sched.add([5, 6], ok)
    with pytest.raises(QueueFull, match="queue is full"):
        sched.add([5, 6], ok)
    with pytest.raises(RequestError, match="prompt: empty"):
        sched.add([], ok)
    with pytest.raises(RequestError, match="vocabulary"):
        sched.add([300], ok)
    with pytest.raises(RequestError, match="context holds 48"):
        sched.add(list(range(3, 51)), ok)
    with pytest.raises(RequestError, match="max_tokens: 40 new tokens.*at most 38"):
        sched.add(list(range(3, 13)), SamplingParams(max_tokens=40))
    with pytest.raises(Exception, match="top_p"):
        sched.add([5], SamplingParams(top_p=1.5))
    with pytest.raises(RequestError, match="no n-gram index"):
        sched.add([5], SamplingParams(max_tokens=4, ngram_lambda=0.5))


def test_stop_token_ends_a_request_and_its_pages_go_back():
    model = tiny_model()
    cache = model.new_cache(8, page_size=8)
    sched = Scheduler(model, ByteTokenizer(), cache, eos_token_id=None)
    p = prompts(1, seed=2)[0]
    free = reference(model, p, SamplingParams(temperature=0, max_tokens=8))
    r = sched.add(p, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(free[3],)))
    sched.run()
    assert r.output_ids == free[:free.index(free[3]) + 1] and r.finish_reason == "stop"
    assert cache.free_pages == 8


def test_ngram_lambda_one_follows_the_infgram_distribution(engine):
    """With the ∞-gram weight 1 and greedy decoding, each token is the argmax of the engine's own ∞-gram
    next-token distribution of the context so far (whenever the context has a match)."""
    tok = engine.tokenizer
    model = tiny_model(vocab_size=tok.vocab_size)
    sched = Scheduler(model, tok, model.new_cache(8, page_size=32), ngram=engine, eos_token_id=None)
    prompt = tok.encode("To be, or not to be").tolist()
    r = sched.add(prompt, SamplingParams(temperature=0, max_tokens=12, ngram_lambda=1.0))
    sched.run()
    ctx = list(prompt)
    for t in r.output_ids:
        ntd = engine.infgram_ntd(ctx)["result_by_token_id"]
        best = max(ntd.values(), key=lambda x: x["prob"])["prob"]
        assert ntd[t]["prob"] == best
        ctx.append(t)
    # a weight of 0 is the plain LM
    r0 = sched.add(prompt, SamplingParams(temperature=0, max_tokens=12, ngram_lambda=0.0))
    sched.run()
    assert r0.output_ids == reference(model, prompt, SamplingParams(temperature=0, max_tokens=12))
