"""retro/infgram.py on a real small index: the incremental suffix against a brute-force search with
`count`, its distribution against `infgram_ntd`, the same through the sync and async gRPC clients, the
number of engine calls, and the interpolation against a hand computation."""

from __future__ import annotations

import asyncio
import random
from itertools import pairwise

import pytest
import torch

from ngram_fixtures import engine_fixture, ngram_index_fixture  # noqa: F401 - the fixtures engine, ngram_index
from retrogram.retro.infgram import InfgramState, lambda_for_length, mix, mix_batch, ngram_probs
from retrogram.retro.sampling import SamplingParams, make_generator, sample


class CountingEngine:
    """The real engine, counting the calls made to it."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0
        self.vocab_size = engine.vocab_size

    def __getattr__(self, name):
        method = getattr(self.engine, name)

        def call(*a, **kw):
            self.calls += 1
            return method(*a, **kw)
        return call


def random_walk(engine, n: int, seed: int, oov_every: int = 0) -> tuple[list[int], list[int]]:
    """A prompt from the corpus, then n tokens: mostly the corpus's own continuation (long matches),
    sometimes a random token (the match breaks), every oov_every-th an id past the vocabulary."""
    rng = random.Random(seed)
    doc = engine.get_doc_by_ix(rng.randrange(engine.get_total_doc_cnt()), max_disp_len=400)["token_ids"]
    start = rng.randrange(len(doc) - 30)
    prompt = doc[start:start + 20]
    walk, ctx = [], list(prompt)
    for i in range(n):
        if oov_every and i % oov_every == oov_every - 1:
            t = engine.vocab_size + rng.randrange(50)
        elif rng.random() < 0.8:
            tail = ctx[max((j + 1 for j, x in enumerate(ctx) if x >= engine.vocab_size), default=0):]
            dist = engine.infgram_ntd(tail)["result_by_token_id"]
            toks = [t for t in dist if t < engine.vocab_size]
            t = rng.choice(toks) if toks else rng.randrange(engine.vocab_size)
        else:
            t = rng.randrange(engine.vocab_size)
        walk.append(t)
        ctx.append(t)
    return prompt, walk


def brute_force_suffix_len(engine, ctx: list[int]) -> int:
    """Grow the suffix one token at a time until it no longer occurs (occurrence is monotone)."""
    L = 0
    while L < len(ctx) and ctx[-L - 1] < engine.vocab_size and engine.count(ctx[-L - 1:])["count"] > 0:
        L += 1
    return L


def known_tail(engine, ctx: list[int]) -> list[int]:
    return ctx[max((j + 1 for j, x in enumerate(ctx) if x >= engine.vocab_size), default=0):]


@pytest.mark.parametrize("seed, oov_every", [(0, 0), (1, 0), (2, 37)])
def test_incremental_suffix_equals_brute_force_and_infgram_ntd(engine, seed, oov_every):
    n = 300
    prompt, walk = random_walk(engine, n, seed, oov_every)
    counting = CountingEngine(engine)
    state = InfgramState(counting).start(prompt)
    ctx = list(prompt)
    lengths = []
    for t in [None] + walk:
        if t is not None:
            state.append(t)
            ctx.append(t)
        L = brute_force_suffix_len(engine, ctx)
        assert state.suffix_len == L and state.suffix == ctx[len(ctx) - L:]
        want = engine.infgram_ntd(known_tail(engine, ctx))
        assert want.pop("suffix_len") == L
        assert state.ntd == want
        lengths.append(L)
    # the walk exercises long matches, breaks and the empty suffix
    assert max(lengths) >= 15 and lengths.count(0) > 10
    assert any(0 < b <= a for a, b in pairwise(lengths))   # shrunk to a shorter, non-empty match
    # engine calls: one to start, then one per append plus one per dropped token (<= 2 per token), plus the
    # unigram once
    assert counting.calls == state.calls
    assert counting.calls <= 1 + 2 * n + 1
    assert counting.calls / n < 2


def test_amortised_calls_on_a_text_that_keeps_breaking(engine):
    """Random tokens: nearly every append drops the whole suffix; calls stay <= 2 per token."""
    rng = random.Random(5)
    counting = CountingEngine(engine)
    state = InfgramState(counting).start([])
    for _ in range(500):
        state.append(rng.randrange(engine.vocab_size))
    assert counting.calls <= 1 + 2 * 500 + 1


def test_the_clients_give_the_same_states(engine, ngram_index):
    from retrogram.services.client import AsyncNgramClient, NgramClient
    from retrogram.services.launch import ThreadServer
    from retrogram.services.ngram_service import NgramServicer

    prompt, walk = random_walk(engine, 60, seed=3, oov_every=25)
    local = InfgramState(engine).start(prompt)
    expected = []
    for t in walk:
        local.append(t)
        expected.append((local.suffix_len, local.ntd))

    with ThreadServer([NgramServicer(ngram_index)]).load() as srv:
        with NgramClient(srv.address) as client:
            vocab = client.info()[0]["vocab_size"]
            assert vocab == engine.vocab_size
            state = InfgramState(client, vocab_size=vocab).start(prompt)
            got = [(state.append(t).suffix_len, state.ntd) for t in walk]
            assert got == expected

        async def run_async():
            async with AsyncNgramClient(srv.address) as client:
                state = await InfgramState(client, vocab_size=vocab).start_async(prompt)
                out = []
                for t in walk:
                    await state.append_async(t)
                    out.append((state.suffix_len, state.ntd))
                return out

        assert asyncio.run(run_async()) == expected


def test_mix_equals_a_hand_computation(engine):
    ctx = engine.tokenize("Enter the king")
    r = engine.infgram_ntd(ctx)
    assert r["suffix_len"] > 0 and not r["approx"] and len(r["result_by_token_id"]) > 1
    V = engine.vocab_size
    lm = torch.softmax(torch.randn(V, dtype=torch.float64), -1)
    lam = 0.35
    got = mix(lm, r, lam)
    for t in range(V):   # every token, by hand
        c = r["result_by_token_id"].get(t, {"cont_cnt": 0})["cont_cnt"]
        want = (1 - lam) * float(lm[t]) + lam * c / r["prompt_cnt"]
        assert abs(float(got[t]) - want) < 1e-6, t
    assert abs(float(got.sum()) - 1) < 1e-6
    assert torch.equal(mix(lm, r, 0.0), lm) and torch.equal(mix(lm, None, 0.5), lm)
    with pytest.raises(ValueError, match="lam"):
        mix(lm, r, 1.5)


def test_mix_with_a_smaller_lm_vocabulary_renormalises(engine):
    r = engine.infgram_ntd(engine.tokenize("the king"))
    toks = sorted(r["result_by_token_id"])
    V = toks[len(toks) // 2] + 1   # an LM vocabulary that holds only some of the continuations
    kept = {t: v["cont_cnt"] for t, v in r["result_by_token_id"].items() if t < V}
    p = ngram_probs(r, V)
    assert p.shape == (V,) and abs(float(p.sum()) - 1) < 1e-6
    for t, c in kept.items():
        assert abs(float(p[t]) - c / sum(kept.values())) < 1e-6
    lm = torch.full((toks[0],), 1.0 / toks[0])   # no continuation inside: the LM alone
    assert ngram_probs(r, toks[0]) is None and torch.equal(mix(lm, r, 0.9), lm)


def test_lambda_for_length():
    table = ((1, 0.1), (4, 0.3), (16, 0.6))
    assert [lambda_for_length(n, table) for n in (0, 1, 3, 4, 15, 16, 1000)] == [0, 0.1, 0.1, 0.3, 0.3, 0.6, 0.6]
    assert lambda_for_length(0, ((0, 0.2),)) == 0.2


def test_sampling_through_the_infgram_mix(engine):
    """The generate loop's use: greedy with lam=1 follows the ∞-gram's most likely continuation."""
    prompt = engine.tokenize("Enter the king")
    V = engine.vocab_size
    state = InfgramState(engine).start(prompt)
    params = [SamplingParams(temperature=0, ngram_lambda=1.0), SamplingParams(temperature=0.8, seed=1,
                                                                               ngram_lambda=0.5)]
    gens = [make_generator(p) for p in params]
    for _ in range(10):
        logits = torch.randn(2, V)
        ntds, lams = [state.ntd] * 2, [p.lambda_for(state.suffix_len) for p in params]
        out = sample(logits, params, gens, mix=lambda probs, ntds=ntds, lams=lams: mix_batch(probs, ntds, lams))
        dist = state.ntd["result_by_token_id"]
        best = max(dist, key=lambda t: dist[t]["cont_cnt"])
        assert dist[int(out.tokens[0])]["cont_cnt"] == dist[best]["cont_cnt"]
        row1 = mix(logits[1].softmax(-1), state.ntd, 0.5)
        torch.testing.assert_close(out.logprobs[1], row1[out.tokens[1]].log())
        state.append(int(out.tokens[0]))
