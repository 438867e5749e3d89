"""retro/score.py against brute force: the LM side position by position (one forward per prefix), the
∞-gram side by counting suffixes, the mixture by hand; the perplexity against transformers' own loss."""

from __future__ import annotations

import math

import pytest
import torch

from ngram_fixtures import engine_fixture, ngram_index_fixture  # noqa: F401 - the fixtures engine, ngram_index
from retrogram.index.errors import UserError
from retrogram.retro.infgram import InfgramState, mix
from retrogram.retro.score import infgram_probs, score_ids, score_text


class ToyLM:
    """A small causal model: the logits at t depend on token t and on the mean of all tokens up to t."""

    def __init__(self, vocab: int, seed: int = 0, d: int = 16):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(vocab, d, generator=g)
        self.out = torch.randn(d, vocab, generator=g) * 2

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb[ids]                                                    # [T, d]
        mean = e.cumsum(0) / torch.arange(1, len(ids) + 1)[:, None]
        return (e + mean) @ self.out                                         # [T, V]


def brute_lm(lm, ids: list[int], i: int) -> float:
    """log p(ids[i] | ids[:i]) from a forward over the prefix alone."""
    return float(torch.log_softmax(lm(torch.tensor(ids[:i]))[-1].double(), -1)[ids[i]])


def brute_infgram(engine, ids: list[int], i: int) -> tuple[float, int]:
    """(∞-gram prob of ids[i] given ids[:i], suffix length) by counting: unknown ids occur nowhere."""
    known = lambda t: t < engine.vocab_size
    ctx = ids[:i]
    L = 0
    while L < len(ctx) and known(ctx[-L - 1]) and engine.count(ctx[-L - 1:])["count"] > 0:
        L += 1
    suffix = ctx[len(ctx) - L:]
    denom = engine.count(suffix)["count"] if L else engine.get_total_tok_cnt()
    num = engine.count(suffix + [ids[i]])["count"] if known(ids[i]) else 0
    return num / denom, L


@pytest.fixture(scope="module")
def text_ids(engine):
    doc = engine.get_doc_by_ix(1, max_disp_len=120)["token_ids"]
    # corpus text (long matches), then text the corpus does not hold
    return doc[20:80] + engine.tokenize(" Quantum chromodynamics describes gluons and quarks; zebra!")


def test_lm_logprobs_and_perplexity_against_brute_force(engine, text_ids):
    lm = ToyLM(engine.vocab_size)
    for start in (1, 7):
        s = score_ids(text_ids, lm, start=start)
        want = torch.tensor([brute_lm(lm, text_ids, i) for i in range(start, len(text_ids))], dtype=torch.float64)
        torch.testing.assert_close(s.lm_logprobs, want, rtol=1e-5, atol=1e-5)
        assert s.token_ids.tolist() == text_ids[start:]
        assert torch.equal(s.logprobs, s.lm_logprobs) and s.ngram_probs is None
        assert s.perplexity == pytest.approx(math.exp(-float(want.mean())), rel=1e-6)


@pytest.mark.parametrize("lam, table", [(0.3, None), (0.0, ((1, 0.1), (3, 0.4), (8, 0.7)))])
def test_mixed_scores_against_brute_force(engine, text_ids, lam, table):
    lm = ToyLM(engine.vocab_size, seed=1)
    s = score_ids(text_ids, lm, engine, ngram_lambda=lam, ngram_lambda_by_length=table)
    for k, i in enumerate(range(1, len(text_ids))):
        p_ng, L = brute_infgram(engine, text_ids, i)
        assert s.suffix_len[k] == L and s.ngram_probs[k] == pytest.approx(p_ng, rel=1e-12)
        w = lam if table is None else max([v for m, v in table if m <= L], default=0.0)
        assert s.lambdas[k] == w
        want = math.log((1 - w) * math.exp(brute_lm(lm, text_ids, i)) + w * p_ng)
        assert float(s.logprobs[k]) == pytest.approx(want, abs=1e-5)
    assert int(s.suffix_len.max()) >= 10 and float(s.ngram_probs.min()) == 0   # long matches and misses
    assert s.perplexity == pytest.approx(math.exp(-float(s.logprobs.mean())))


def test_unknown_ids_for_the_engine(engine, text_ids):
    """An LM vocabulary larger than the index's: unknown ids get probability 0 and cut the context."""
    V = engine.vocab_size
    ids = text_ids[:30] + [V + 3] + text_ids[30:50] + [V + 1, V + 7] + text_ids[50:]
    prob, suffix_len = infgram_probs(engine, ids)
    for i in range(len(ids)):
        p, L = brute_infgram(engine, ids, i)
        assert (prob[i], suffix_len[i]) == (pytest.approx(p, rel=1e-12), L), i
    lm = ToyLM(V + 10, seed=2)
    s = score_ids(ids, lm, engine, ngram_lambda=0.5)
    assert s.ngram_probs[29] == 0 and s.logprobs[29] == pytest.approx(math.log(0.5) + float(s.lm_logprobs[29]))


def test_scores_agree_with_the_generation_side(engine, text_ids):
    """The mixed log-prob of each token equals log(mix(p_lm, InfgramState's ntd, lam)) at that token,
    wherever the ntd is exact (not sampled)."""
    lm = ToyLM(engine.vocab_size, seed=3)
    ids = text_ids[:40]
    s = score_ids(ids, lm, engine, ngram_lambda=0.4)
    logits = lm(torch.tensor(ids))
    state = InfgramState(engine).start(ids[:1])
    checked = 0
    for i in range(1, len(ids)):
        if not state.ntd["approx"]:
            p = mix(logits[i - 1].double().softmax(-1), state.ntd, 0.4)
            assert float(s.logprobs[i - 1]) == pytest.approx(math.log(float(p[ids[i]])), abs=1e-9)
            assert s.suffix_len[i - 1] == state.suffix_len
            checked += 1
        state.append(ids[i])
    assert checked > 20


def test_perplexity_equals_transformers_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (50,))
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss
        s = score_ids(ids, lambda x: model(x[None]).logits[0])
    assert s.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_score_text_and_bad_arguments(engine):
    lm = ToyLM(engine.vocab_size)
    tok = engine.tokenizer
    s = score_text("the king is dead", tok, lm, engine, prefix_ids=[1], ngram_lambda=0.2)
    assert s.token_ids.tolist() == tok.encode("the king is dead").tolist()
    with pytest.raises(UserError, match="start"):
        score_ids([5], lm)
    with pytest.raises(UserError, match="ngram_lambda"):
        score_ids([5, 6, 7], lm, engine, ngram_lambda=2.0)
    with pytest.raises(ValueError, match="logits_fn"):
        score_ids([5, 6, 7], lambda x: lm(x)[:-1])
