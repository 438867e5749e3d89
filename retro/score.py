"""Per-token log-probabilities and perplexity of a token sequence, under an LM and under LM + ∞-gram.

    s = score_ids(ids, logits_fn)                                   # the LM alone
    s = score_ids(ids, logits_fn, engine, ngram_lambda=0.3)         # p = 0.7 p_lm + 0.3 p_∞gram
    s.logprobs, s.perplexity

logits_fn(ids [T] int64) -> logits [T, V]: row t predicts token t + 1 (any causal LM: the decoder's
Transformer, a transformers model, ...). Tokens ids[start:] are scored, each given all the tokens before it
(start >= 1: the first token has no prediction; put a BOS in front to score it).

The ∞-gram side is one `score_sequence` call (Engine or NgramClient): for every position the probability
of the token after the longest suffix of its context that occurs in the corpus, cont_cnt / prompt_cnt,
exact (the generation side, infgram.InfgramState, reads `ntd`, which samples when a suffix occurs more than
max_support times). Ids outside the engine's vocabulary occur nowhere: such a token gets ∞-gram
probability 0 and the contexts after it start after it, as in InfgramState.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..index.errors import UserError
from .infgram import lambda_for_length


@dataclass
class Scores:
    token_ids: torch.Tensor             # [N] the scored tokens, ids[start:]
    lm_logprobs: torch.Tensor           # [N] float64, log p_lm(token | tokens before)
    logprobs: torch.Tensor              # [N] float64, log p(token | tokens before): mixed when an engine is given
    ngram_probs: torch.Tensor | None    # [N] float64, the ∞-gram probability of each token
    suffix_len: torch.Tensor | None     # [N] int64, the matched suffix length of its context
    lambdas: torch.Tensor | None        # [N] float64, the weight used at each token

    @property
    def perplexity(self) -> float:
        return perplexity(self.logprobs)

    @property
    def lm_perplexity(self) -> float:
        return perplexity(self.lm_logprobs)


def perplexity(logprobs: torch.Tensor) -> float:
    return math.exp(-float(logprobs.double().mean()))


def lm_logprobs(ids: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor], start: int = 1) -> torch.Tensor:
    """[T - start] float64: log p_lm(ids[i] | ids[:i]) for i >= start, from one forward."""
    logits = logits_fn(ids)                                            # [T, V]
    if logits.ndim != 2 or logits.shape[0] != len(ids):
        raise ValueError(f"logits_fn: expected logits of shape [{len(ids)}, V], got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits[start - 1:-1].double(), dim=-1)   # [N, V]
    return logp.gather(1, ids[start:, None].to(logp.device)).squeeze(1).cpu()


def infgram_probs(engine: Any, ids: Sequence[int], vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prob, suffix_len), one entry per token of ids: the ∞-gram probability of ids[i] given ids[:i] and
    the length of the matched suffix. One score_sequence call per run of in-vocabulary ids (one for all of
    them when every id is in the vocabulary)."""
    ids = [int(t) for t in ids]
    vocab_size = vocab_size if vocab_size is not None else getattr(engine, "vocab_size", None)
    prob, suffix_len = np.zeros(len(ids)), np.zeros(len(ids), np.int64)
    a = 0
    for b in [i for i, t in enumerate(ids) if vocab_size is not None and not 0 <= t < vocab_size] + [len(ids)]:
        if b > a:   # ids[a:b] is a run of known ids: the contexts of its tokens start at a
            r = engine.score_sequence(ids[a:b])
            prob[a:b], suffix_len[a:b] = np.asarray(r["prob"]), np.asarray(r["suffix_len"])
        if b < len(ids) and b > a:   # an unknown id: probability 0 after the longest suffix of ids[a:b]
            # infgram_prob finds that suffix; cont_id 0 (any known id) only completes the query
            suffix_len[b] = engine.infgram_prob(ids[a:b], 0)["suffix_len"]
        a = b + 1
    return prob, suffix_len


def score_ids(ids: Sequence[int] | torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor],
              engine: Any = None, ngram_lambda: float = 0.0,
              ngram_lambda_by_length: Sequence[tuple[int, float]] | None = None, start: int = 1,
              vocab_size: int | None = None) -> Scores:
    """Score ids[start:] under logits_fn, and, with an engine, under (1 - lam) p_lm + lam p_∞gram where lam
    is ngram_lambda, or lambda_for_length(suffix_len, ngram_lambda_by_length) when a table is given.
    vocab_size: the engine's vocabulary (default engine.vocab_size; give it for a client)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
    if not 1 <= start < len(ids):
        raise UserError(f"start: expected 1 <= start < {len(ids)} (the number of tokens), got {start}")
    if not 0 <= ngram_lambda <= 1:
        raise UserError(f"ngram_lambda: expected a number in [0, 1], got {ngram_lambda!r}")
    lm = lm_logprobs(ids, logits_fn, start)
    scored = ids[start:]
    if engine is None:
        return Scores(scored, lm, lm, None, None, None)
    prob, suffix_len = infgram_probs(engine, ids.tolist(), vocab_size)
    prob, suffix_len = torch.from_numpy(prob[start:]), torch.from_numpy(suffix_len[start:])
    if ngram_lambda_by_length is not None:
        lams = torch.tensor([lambda_for_length(int(n), ngram_lambda_by_length) for n in suffix_len], dtype=torch.float64)
    else:
        lams = torch.full_like(prob, float(ngram_lambda))
    mixed = torch.log((1 - lams) * lm.exp() + lams * prob)
    return Scores(scored, lm, mixed, prob, suffix_len, lams)


def score_text(text: str, tokenizer, logits_fn: Callable[[torch.Tensor], torch.Tensor], engine: Any = None,
               prefix_ids: Sequence[int] = (), **kw) -> Scores:
    """score_ids of prefix_ids + the text's tokens, scoring the text's tokens (a BOS or a prompt as prefix
    gives the first one a context); kw as score_ids."""
    if not isinstance(text, str) or not text:
        raise UserError("text: expected a non-empty string")
    ids = [int(t) for t in prefix_ids] + [int(t) for t in tokenizer.encode(text)]
    return score_ids(ids, logits_fn, engine, start=max(1, len(prefix_ids)), **kw)
