"""retro/sampling.py against transformers' logits processors and a plain per-row loop, on random logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from retrogram.retro.sampling import SamplingError, SamplingParams, draw, make_generator, sample, sampling_logits

V = 500


def random_case(seed: int, B: int = 12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    choices = {"temperature": [0.3, 0.7, 1.0, 1.8], "top_k": [0, 1, 7, 60, V + 5],
               "top_p": [1.0, 0.95, 0.6, 0.2, 1e-6], "repetition_penalty": [1.0, 1.3, 0.7, 2.5]}
    params, prev = [], []
    for _ in range(B):
        pick = {k: v[int(torch.randint(len(v), (1,), generator=g))] for k, v in choices.items()}
        params.append(SamplingParams(**pick).validate())
        n = int(torch.randint(0, 40, (1,), generator=g))
        prev.append(torch.randint(0, V, (n,), generator=g))   # duplicates included; some rows empty
    return logits, params, prev


def transformers_row(logits: torch.Tensor, p: SamplingParams, prev: torch.Tensor) -> torch.Tensor:
    x = logits.clone().unsqueeze(0)
    ids = prev.unsqueeze(0)
    if p.repetition_penalty != 1 and len(prev):
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    return x[0]


def loop_row(logits: torch.Tensor, p: SamplingParams, prev: torch.Tensor) -> torch.Tensor:
    """The same steps one token at a time, in plain Python."""
    x = [float(v) for v in logits]
    for t in set(prev.tolist()):
        x[t] = x[t] * p.repetition_penalty if x[t] < 0 else x[t] / p.repetition_penalty
    x = [v / p.temperature for v in x]
    order = sorted(range(V), key=lambda t: -x[t])
    keep = set(range(V))
    if p.top_k:
        kth = x[order[min(p.top_k, V) - 1]]
        keep = {t for t in keep if x[t] >= kth}
    if p.top_p < 1:
        z = sum(math.exp(x[t]) for t in keep)
        mass, kept = 0.0, set()
        for t in order:
            if t in keep and mass < p.top_p:
                kept.add(t)
                mass += math.exp(x[t]) / z
        keep = kept
    return torch.tensor([x[t] if t in keep else -math.inf for t in range(V)])


def assert_same_logits(a: torch.Tensor, b: torch.Tensor):
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = ~torch.isinf(a)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_processors_match_transformers_and_a_plain_loop(seed):
    logits, params, prev = random_case(seed)
    got = sampling_logits(logits, params, prev)
    for i, p in enumerate(params):
        assert_same_logits(got[i], transformers_row(logits[i], p, prev[i]))
        assert_same_logits(got[i], loop_row(logits[i], p, prev[i]))
    assert torch.isinf(got).any() and (~torch.isinf(got)).sum(-1).min() >= 1   # the cases do filter


def test_repetition_penalty_skips_ids_past_the_vocabulary():
    logits, _, _ = random_case(0, B=1)
    prev = torch.tensor([3, V + 10, 3, 7])
    p = SamplingParams(repetition_penalty=1.7)
    assert_same_logits(sampling_logits(logits, [p], [prev])[0], transformers_row(logits[0], p, prev))


def test_top_p_boundaries():
    # one huge logit: a float32 cumulative sum reaches 1.0 long before the tail; top_p=1 must keep it all
    logits = torch.cat([torch.tensor([[40.0]]), torch.randn(1, V - 1)], dim=1)
    assert not torch.isinf(sampling_logits(logits, [SamplingParams(top_p=1.0)])).any()
    logits = torch.randn(3, V)
    kept = ~torch.isinf(sampling_logits(logits, [SamplingParams(top_p=1e-9)] * 3))
    assert kept.sum(-1).tolist() == [1, 1, 1]
    assert kept.float().argmax(-1).tolist() == logits.argmax(-1).tolist()
    # top_p exactly at a token's cumulative mass keeps that token and no more (transformers' rule)
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    out = sampling_logits(probs.log(), [SamplingParams(top_p=0.75)])
    assert (~torch.isinf(out)).tolist() == [[True, True, False, False]]
    assert_same_logits(out[0], transformers_row(probs.log()[0], SamplingParams(top_p=0.75), torch.tensor([])))


def test_greedy_rows_take_the_argmax_of_the_penalised_logits():
    logits, params, prev = random_case(3)
    greedy = [SamplingParams(temperature=0, top_k=p.top_k, top_p=p.top_p, repetition_penalty=p.repetition_penalty)
              for p in params]
    gens = [torch.Generator().manual_seed(i) for i in range(len(params))]
    out = sample(logits, greedy, gens, prev)
    for i, p in enumerate(greedy):
        want = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(prev[i][None], logits[i:i + 1].clone()) \
            if len(prev[i]) else logits[i:i + 1]
        assert out.tokens[i] == want.argmax()
    torch.testing.assert_close(out.logprobs, logits.log_softmax(-1).gather(1, out.tokens[:, None])[:, 0])


def test_a_seeded_request_draws_the_same_tokens_alone_and_in_any_batch():
    V_small, steps = 50, 30
    w = torch.randn(V_small, V_small)   # a fixed "model": next logits depend on the last token

    def run(batch: list[SamplingParams]) -> list[list[int]]:
        gens = [make_generator(p) for p in batch]
        last = torch.zeros(len(batch), dtype=torch.long)
        hist = [[] for _ in batch]
        for _ in range(steps):
            prev = [torch.tensor(h, dtype=torch.long) for h in hist]
            last = sample(w[last], batch, gens, prev).tokens
            for h, t in zip(hist, last.tolist()):
                h.append(t)
        return hist

    req = SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.2, seed=1234)
    alone = run([req])[0]
    others = [SamplingParams(temperature=1.5, seed=7), SamplingParams(temperature=0), SamplingParams(top_k=3),
              SamplingParams(temperature=0.5, top_k=10, seed=99)]
    torch.manual_seed(0)
    batched = run(others[:2] + [req] + others[2:])
    assert batched[2] == alone
    torch.manual_seed(1)   # another global state and order: still the same
    assert run([others[3], req, others[0]])[1] == alone
    assert run([SamplingParams(**{**req.__dict__, "seed": 1235})])[0] != alone


def test_draw_follows_the_distribution():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 40000
    torch.manual_seed(0)
    tokens = draw(p.expand(n, -1).clone(), [None] * n)                 # the global generator, one call
    freq = torch.bincount(tokens, minlength=5).float() / n
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    assert freq[4] == 0
    g = torch.Generator().manual_seed(5)                               # one request, draw after draw
    seq = torch.tensor([int(draw(p[None], [g])) for _ in range(4000)])
    torch.testing.assert_close(torch.bincount(seq, minlength=5).float() / 4000, p, atol=0.025, rtol=0)


def test_sample_follows_the_processed_distribution():
    logits = torch.randn(1, 8) * 2
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9)
    want = sampling_logits(logits, [params]).softmax(-1)[0]
    n = 20000
    torch.manual_seed(1)
    tokens = sample(logits.expand(n, -1), [params] * n, [None] * n).tokens
    torch.testing.assert_close(torch.bincount(tokens, minlength=8).float() / n, want, atol=0.012, rtol=0)


def test_mix_hook_changes_the_distribution_sampled_and_the_logprobs():
    logits = torch.randn(2, V)
    onehot = torch.zeros(V)
    onehot[17] = 1.0
    lam = 0.9

    def mix(probs):
        return (1 - lam) * probs + lam * onehot

    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)]
    out = sample(logits, params, [None, make_generator(params[1])], mix=mix)
    assert out.tokens[0] == 17
    want = mix(logits.softmax(-1)).log()
    torch.testing.assert_close(out.logprobs, want.gather(1, out.tokens[:, None])[:, 0])
    # a mix that puts all the mass on one token: every row draws it, whatever its knobs
    out = sample(logits, [SamplingParams(temperature=2.0, top_k=50)] * 2, [None, None], mix=lambda p: p * 0 + onehot)
    assert out.tokens.tolist() == [17, 17] and torch.allclose(out.logprobs, torch.zeros(2))


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1), ("top_k", 2.5), ("top_p", 0.0),
    ("top_p", 1.5), ("repetition_penalty", 0.0), ("seed", -1), ("seed", "7"), ("max_tokens", 0),
    ("stop", "###"), ("stop", ("",)), ("stop_token_ids", (-3,)), ("ngram_lambda", 1.2),
    ("ngram_lambda_by_length", ((3, 0.5), (1, 0.2))), ("ngram_lambda_by_length", ((0, 2.0),)),
    ("ngram_lambda_by_length", ()), ("ignore_eos", 1),
])
def test_validate_names_the_field(field, value):
    with pytest.raises(SamplingError, match=f"^{field}: expected"):
        SamplingParams(**{field: value}).validate()


def test_valid_params_pass_and_lambda_by_length():
    p = SamplingParams(temperature=0, top_k=3, top_p=0.5, seed=0, stop=["\n\n"], stop_token_ids=[2],
                       ngram_lambda=0.3).validate()
    assert p.lambda_for(0) == p.lambda_for(50) == 0.3
    p = SamplingParams(ngram_lambda_by_length=((1, 0.1), (4, 0.5))).validate()
    assert [p.lambda_for(n) for n in (0, 1, 3, 4, 100)] == [0.0, 0.1, 0.1, 0.5, 0.5]
