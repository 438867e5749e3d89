"""Sampling: per-request parameters and one batched step from logits to tokens.

    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=1), SamplingParams(temperature=0)]
    gens = [make_generator(p, logits.device) for p in params]
    out = sample(logits, params, gens, prev_tokens)      # out.tokens [B], out.logprobs [B]

One step, every row with its own parameters (all as per-row tensors, so one batch runs mixed requests):
  1. mix (optional hook): probs [B, V] -> probs [B, V], applied to softmax(logits); the step goes on with the
     log of what it returns. This is how the ∞-gram interpolation (retro/infgram.py) enters: it works on
     probabilities, and every later step works on log-probabilities as well as on logits (softmax
     ignores the constant). A zero probability becomes -inf: that token is never drawn.
  2. repetition penalty (transformers' rule): a token already in prev_tokens has its logit divided by
     the penalty when positive, multiplied when negative.
  3. temperature; 0 means greedy (argmax after step 2).
  4. top-k then top-p (transformers' rules: top-k keeps ties with the k-th logit; top-p keeps the
     smallest set of most likely tokens whose mass reaches top_p), from one descending sort.
  5. a draw: argmax(p / E) with E ~ Exp(1) i.i.d. per token is a draw from p (the exponential race).
     Each seeded request draws its noise from its own torch.Generator, so its tokens do not depend on
     what else is in the batch; unseeded rows share the global generator.

`logprobs` are those of the chosen tokens under the model's distribution after step 1 (the interpolated
one when mixing), before the sampling knobs of steps 2-4 reshape it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import torch

from ..index.errors import UserError


class SamplingError(UserError):
    """A sampling parameter out of range; the message names it (INVALID_ARGUMENT in the service)."""


@dataclass
class SamplingParams:
    temperature: float = 1.0            # >= 0; 0 = greedy
    top_k: int = 0                      # >= 0; 0 = off
    top_p: float = 1.0                  # (0, 1]; 1 = off
    repetition_penalty: float = 1.0     # > 0; 1 = off
    seed: int | None = None             # a per-request generator: the same tokens whatever the batch
    max_tokens: int = 256               # >= 1
    stop: tuple[str, ...] = ()          # stop strings (not part of the output)
    stop_token_ids: tuple[int, ...] = ()
    ngram_lambda: float = 0.0           # [0, 1]: weight of the ∞-gram distribution (retro/infgram.py)
    # ((min_suffix_len, lambda), ...), ascending: when set, the weight depends on the matched suffix
    # length and replaces ngram_lambda (infgram.lambda_for_length)
    ngram_lambda_by_length: tuple[tuple[int, float], ...] | None = None
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        def bad(field: str, expected: str):
            raise SamplingError(f"{field}: expected {expected}, got {getattr(self, field)!r}")

        def real(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not real(self.temperature) or self.temperature < 0:
            bad("temperature", "a number >= 0 (0 = greedy)")
        if not integer(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1] (1 = off)")
        if not real(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a number > 0 (1 = off)")
        if self.seed is not None and (not integer(self.seed) or not 0 <= self.seed < 2**64):
            bad("seed", "an integer in [0, 2**64) or none")   # the proto's uint64; torch takes all of it
        if not integer(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "an integer >= 1")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a list of non-empty strings")
        if not all(integer(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of token ids (integers >= 0)")
        if not real(self.ngram_lambda) or not 0 <= self.ngram_lambda <= 1:
            bad("ngram_lambda", "a number in [0, 1]")
        table = self.ngram_lambda_by_length
        if table is not None:
            ok = bool(table) and all(isinstance(e, (tuple, list)) and len(e) == 2 and integer(e[0]) and e[0] >= 0
                                     and real(e[1]) and 0 <= e[1] <= 1 for e in table)
            if not ok or any(a[0] >= b[0] for a, b in pairwise(table)):
                bad("ngram_lambda_by_length", "a non-empty list of (min_suffix_len >= 0, lambda in [0, 1]) "
                                              "pairs with strictly increasing min_suffix_len")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "true or false")
        return self

    def lambda_for(self, suffix_len: int) -> float:
        """The ∞-gram weight for a matched suffix of `suffix_len` tokens."""
        if self.ngram_lambda_by_length is None:
            return self.ngram_lambda
        from .infgram import lambda_for_length

        return lambda_for_length(suffix_len, self.ngram_lambda_by_length)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The request's own generator when it has a seed (keep it for the whole request), else None."""
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g


class Sampled(NamedTuple):
    tokens: torch.Tensor     # [B] int64
    logprobs: torch.Tensor   # [B] float32: log p(token) under the model's (mixed) distribution


def _row_tensor(values: list, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device).unsqueeze(1)   # [B, 1]


def apply_repetition_penalty(logits: torch.Tensor, penalty: torch.Tensor,
                             prev_tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """logits [B, V] (in place), penalty [B, 1]: gather each row's previous tokens, rescale, scatter back.
    Rows are padded with their own first token (a repeated index writes the same value again). Ids past
    the logits' vocabulary (a tokenizer larger than the LM head) cannot be generated and are skipped."""
    V = logits.shape[-1]
    prev_tokens = [p[p < V] for p in prev_tokens]
    lens = [len(p) for p in prev_tokens]
    if max(lens, default=0) == 0:
        return logits
    idx = torch.zeros(len(prev_tokens), max(lens), dtype=torch.long, device=logits.device)
    for i, p in enumerate(prev_tokens):
        if lens[i]:
            idx[i, :lens[i]] = p
            idx[i, lens[i]:] = p[0]
    penalty = torch.where(torch.tensor(lens, device=logits.device).unsqueeze(1) > 0, penalty, 1.0)
    score = logits.gather(1, idx)                                      # [B, L]
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter_(1, idx, score)


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool, True where a token is removed. top_k [B, 1] (0 = off), top_p [B, 1] (1 = off)."""
    V = logits.shape[-1]
    desc, order = logits.sort(dim=-1, descending=True)                # [B, V]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    kth = desc.gather(1, k - 1)                                        # [B, 1]
    desc = desc.masked_fill(desc < kth, -math.inf)                     # top-k first, as transformers does
    p = desc.softmax(dim=-1)
    before = p.cumsum(dim=-1) - p                                      # mass of the more likely tokens
    remove_sorted = (desc == -math.inf) | ((before >= top_p) & (top_p < 1))
    return torch.zeros_like(remove_sorted).scatter_(1, order, remove_sorted)


def sampling_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                    prev_tokens: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Steps 2-4 on logits [B, V] (a float32 copy): the logits whose softmax each row draws from
    (greedy rows: penalised only, temperature 1)."""
    x = logits.float().clone()
    if prev_tokens is not None and any(p.repetition_penalty != 1 for p in params):
        x = apply_repetition_penalty(x, _row_tensor([p.repetition_penalty for p in params], x, x.dtype), prev_tokens)
    temperature = _row_tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], x, x.dtype)
    x = x / temperature
    if any(p.top_k > 0 or p.top_p < 1 for p in params):                # the sort only when some row asks
        top_k = _row_tensor([p.top_k for p in params], x, torch.long)
        top_p = _row_tensor([p.top_p for p in params], x, x.dtype)
        x = x.masked_fill(top_k_top_p_mask(x, top_k, top_p), -math.inf)
    return x


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of probs [B, V] by the exponential race; row i's noise comes from generators[i]
    (None: the global generator)."""
    noise = torch.empty_like(probs)
    if any(g is None for g in generators):
        noise.exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    # Exp(1) can be exactly 0; tiny keeps p / noise finite (p <= 1) and a zero p at zero
    return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
           prev_tokens: Sequence[torch.Tensor] | None = None,
           mix: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Sampled:
    """One token per row of logits [B, V] (see the module doc). prev_tokens: each row's tokens so far (the
    ones the repetition penalty counts: transformers counts prompt and output). mix: probs -> probs."""
    if not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(f"sample: {logits.shape[0]} rows of logits, {len(params)} params, "
                         f"{len(generators)} generators")
    logp = torch.log_softmax(logits.float(), dim=-1)                   # [B, V]
    if mix is not None:
        logp = mix(logp.exp()).log()
    x = sampling_logits(logp if mix is not None else logits, params, prev_tokens)
    tokens = x.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        rows = torch.tensor(sampled, device=x.device)
        tokens[rows] = draw(x[rows].softmax(dim=-1), [generators[i] for i in sampled])
    return Sampled(tokens, logp.gather(1, tokens.unsqueeze(1)).squeeze(1))
