"""Live ∞-gram interpolation for generation.

    state = InfgramState(engine)              # Engine, NgramClient, or AsyncNgramClient (the *_async methods)
    state.start(prompt_ids)                   # one infgram_ntd call for the whole prompt
    ...
    probs = mix(lm_probs, state.ntd, params.lambda_for(state.suffix_len))   # [V]; mix_batch for [B, V]
    state.append(token)                       # amortised O(1) engine calls per token

The ∞-gram distribution after a context is the next-token distribution (`ntd`) of the longest suffix of
the context that occurs in the corpus. When a token t is appended, the new longest suffix is a suffix of
old_suffix + [t] (a suffix of the new context that occurs without its last token is a suffix of the old
context that occurs, so it is no longer than old_suffix): try old_suffix + [t], drop its first token while
it does not occur. Every append adds one token and every failed try drops one, so over n appends there are
at most 2n `ntd` calls (one per append plus one per dropped token), and the context is never searched again.
`ntd` answers the occurrence test too (prompt_cnt 0: it does not occur), so the successful try is also the
distribution. The suffix never holds an id outside the engine's vocabulary: such a token occurs nowhere,
so appending it empties the suffix.

Interpolation: p = (1 - lam) * p_lm + lam * p_ngram. The weight may depend on how long the matched suffix is
(a long match is a confident estimate; the empty one is only the unigram distribution): `lambda_for_length`
reads a table of (min_suffix_len, lambda) pairs; SamplingParams.ngram_lambda_by_length carries one.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import torch

# A step of the suffix search: it yields (engine method, token ids) and is sent the method's result.
Steps = Generator[tuple[str, list[int]], dict, None]


def lambda_for_length(suffix_len: int, table: Sequence[tuple[int, float]]) -> float:
    """The lambda of the last (min_suffix_len, lambda) pair with min_suffix_len <= suffix_len; 0 when
    suffix_len is below the first. E.g. ((1, 0.1), (4, 0.3), (16, 0.6)): no weight for the unigram
    (suffix_len 0), 0.1 for 1-3 matched tokens, 0.3 for 4-15, 0.6 from 16 on."""
    lam = 0.0
    for min_len, value in table:
        if suffix_len < min_len:
            break
        lam = value
    return float(lam)


class InfgramState:
    """The longest suffix of a growing context that occurs in the index, and its next-token distribution.

    engine: anything with `ntd(ids, max_support=)` and `infgram_ntd(ids, max_support=)` (Engine,
        NgramClient; AsyncNgramClient through start_async/append_async).
    vocab_size: the engine's vocabulary (ids at or past it occur nowhere); default: engine.vocab_size when
        it has one (an Engine); for a client give `client.info()[0]["vocab_size"]`.
    calls: engine calls made so far."""

    def __init__(self, engine: Any, vocab_size: int | None = None, max_support: int | None = None):
        self.engine = engine
        self.vocab_size = vocab_size if vocab_size is not None else getattr(engine, "vocab_size", None)
        self.max_support = max_support
        self.suffix: list[int] = []
        self.ntd: dict | None = None   # the engine's ntd result for the suffix
        self.calls = 0
        self._unigram: dict | None = None   # ntd of the empty suffix, asked once

    @property
    def suffix_len(self) -> int:
        return len(self.suffix)

    def _known(self, t: int) -> bool:
        return self.vocab_size is None or 0 <= t < self.vocab_size

    def _start_steps(self, prompt_ids: Sequence[int]) -> Steps:
        ids = [int(t) for t in prompt_ids]
        cut = max((i + 1 for i, t in enumerate(ids) if not self._known(t)), default=0)
        tail = ids[cut:]   # no occurring suffix reaches past an unknown id
        r = yield "infgram_ntd", tail
        self.suffix = tail[len(tail) - r["suffix_len"]:]
        self.ntd = {k: v for k, v in r.items() if k != "suffix_len"}
        if not self.suffix:
            self._unigram = self.ntd

    def _append_steps(self, token: int) -> Steps:
        t = int(token)
        cand = self.suffix + [t] if self._known(t) else []
        while cand:
            r = yield "ntd", cand
            if r["prompt_cnt"] > 0:
                self.suffix, self.ntd = cand, r
                return
            cand = cand[1:]
        if self._unigram is None:
            self._unigram = yield "ntd", []
        self.suffix, self.ntd = [], self._unigram

    def _run(self, steps: Steps) -> None:
        try:
            method, ids = next(steps)
            while True:
                self.calls += 1
                method, ids = steps.send(getattr(self.engine, method)(ids, max_support=self.max_support))
        except StopIteration:
            pass

    async def _run_async(self, steps: Steps) -> None:
        try:
            method, ids = next(steps)
            while True:
                self.calls += 1
                method, ids = steps.send(await getattr(self.engine, method)(ids, max_support=self.max_support))
        except StopIteration:
            pass

    def start(self, prompt_ids: Sequence[int]) -> InfgramState:
        """Begin a context (the prompt; it may be empty): one infgram_ntd call."""
        self._run(self._start_steps(prompt_ids))
        return self

    def append(self, token: int) -> InfgramState:
        self._run(self._append_steps(token))
        return self

    async def start_async(self, prompt_ids: Sequence[int]) -> InfgramState:
        await self._run_async(self._start_steps(prompt_ids))
        return self

    async def append_async(self, token: int) -> InfgramState:
        await self._run_async(self._append_steps(token))
        return self


def ngram_probs(ntd: dict, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """An ntd result as a dense [vocab_size] distribution (the counts, normalised); None when it has no
    mass inside the vocabulary. Ids at or past vocab_size (e.g. end-of-document reported as the separator
    id by an index without an eos id) are dropped and the rest renormalised."""
    items = [(t, v["cont_cnt"]) for t, v in ntd["result_by_token_id"].items() if 0 <= t < vocab_size]
    if not items:
        return None
    ids, counts = zip(*items)
    counts = torch.tensor(counts, dtype=torch.float64)
    if counts.sum() <= 0:
        return None
    p = torch.zeros(vocab_size, dtype=torch.float64)
    p[list(ids)] = counts / counts.sum()
    return p.to(device=device, dtype=torch.float32)


def mix(lm_probs: torch.Tensor, ntd: dict | None, lam: float) -> torch.Tensor:
    """(1 - lam) * lm_probs + lam * p_ngram for lm_probs [V]; lm_probs unchanged when lam is 0 or the
    ∞-gram has nothing to say (no result, or no mass inside the LM's vocabulary)."""
    if not 0 <= lam <= 1:
        raise ValueError(f"lam: expected a number in [0, 1], got {lam!r}")
    p_ngram = ngram_probs(ntd, lm_probs.shape[-1], lm_probs.device) if ntd is not None and lam > 0 else None
    if p_ngram is None:
        return lm_probs
    return (1 - lam) * lm_probs + lam * p_ngram.to(lm_probs.dtype)


def mix_batch(probs: torch.Tensor, ntds: Sequence[dict | None], lams: Sequence[float]) -> torch.Tensor:
    """`mix` row by row for probs [B, V] (row i with ntds[i], lams[i]); the `mix` hook of sampling.sample:
    `sample(logits, params, gens, mix=lambda p: mix_batch(p, ntds, lams))`."""
    return torch.stack([mix(probs[i], ntds[i], lams[i]) for i in range(probs.shape[0])])
