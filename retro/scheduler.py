"""Continuous batching: many generation requests share one model and one paged KV cache.

Each `step()` runs ONE forward over a packed batch: every running request that decodes contributes its
pending token, and requests still reading their prompt contribute a chunk of it (chunked prefill, so a long
prompt never stalls the streams already running). Between steps, waiting requests are admitted when the
cache can hold them, and finished or cancelled ones give their pages back.

Admission reserves pages for the whole request (prompt + max_tokens), so a running request never finds the
cache full halfway through and nothing is ever preempted; the price is pages held for tokens that a stop
string may never need. The waiting queue is bounded: past `max_waiting`, `add` raises QueueFull.

    sched = Scheduler(model, tokenizer, cache)
    req = sched.add(prompt_ids, SamplingParams(max_tokens=32))
    while sched.has_work():
        for ev in sched.step():      # Event(request, token_ids, text, logprobs, finish_reason)
            ...

The scheduler is not thread-safe: one thread calls add / cancel / step (the DecoderService's engine loop).
On CUDA, decode-only steps replay CUDA graphs captured per batch-size bucket (graphs.DecodeGraphs).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..index.errors import UserError
from .attention import prepare_step
from .detokenize import TextStream
from .generate import set_cpu_threads
from .graphs import DecodeGraphs
from .infgram import InfgramState, mix_batch
from .kv_cache import KVCache
from .model import Transformer
from .sampling import SamplingParams, make_generator, sample


class QueueFull(UserError):
    """The waiting queue is at its bound (RESOURCE_EXHAUSTED in the service)."""


class RequestError(UserError):
    """A request that can never run here (too long for the context or the cache); the message names why."""


@dataclass(eq=False)
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream
    generator: torch.Generator | None
    infgram: InfgramState | None
    arrival: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    prefilled: int = 0                    # prompt tokens in the cache
    pending: int | None = None            # sampled token not yet in the cache (the next decode step's input)
    finish_reason: str | None = None      # "stop", "length", "cancelled"
    first_token_at: float | None = None
    finished_at: float | None = None
    admitted_step: int | None = None
    queued_steps: int = 0
    cancelled: bool = False

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    def usage(self) -> dict:
        end = self.finished_at or time.perf_counter()
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.output_ids),
                "time_to_first_token_s": (self.first_token_at - self.arrival) if self.first_token_at else 0.0,
                "total_s": end - self.arrival, "queued_steps": self.queued_steps}


@dataclass
class Event:
    request: Request
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None = None


class Scheduler:
    """Requests in, token events out, one packed forward per step (see the module doc).

    max_running: requests decoding at once; max_waiting: the queue's bound; step_tokens: new tokens per
    forward (decodes first, then prompt chunks); ngram: an Engine or NgramClient for requests with
    ngram_lambda > 0; cuda_graphs: capture decode steps (default: on CUDA with the triton backend)."""

    def __init__(self, model: Transformer, tokenizer, cache: KVCache, *, max_running: int = 64,
                 max_waiting: int = 256, step_tokens: int = 2048, max_context: int | None = None,
                 eos_token_id: int | None = None, ngram=None, cuda_graphs: bool | None = None):
        if max_running < 1 or max_waiting < 0 or step_tokens < max_running:
            raise ValueError(f"max_running {max_running} >= 1, max_waiting {max_waiting} >= 0 and step_tokens "
                             f"{step_tokens} >= max_running expected")
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.max_running, self.max_waiting, self.step_tokens = max_running, max_waiting, step_tokens
        cfg = model.config
        self.max_context = min(max_context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id = eos if eos is not None else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
        self.ngram = ngram
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.steps = 0
        self._next_id = 0
        self._recent: deque[tuple[float, int]] = deque()   # (time, tokens generated) of recent steps
        if model.device.type == "cpu":
            set_cpu_threads()
        if cuda_graphs is None:
            cuda_graphs = model.device.type == "cuda" and model.attn_backend == "triton"
        self.graphs = DecodeGraphs(model, cache, max_running, self.max_context) if cuda_graphs else None

    # ---- requests --------------------------------------------------------------------------------------
    def add(self, prompt_ids, params: SamplingParams) -> Request:
        """Queue a request (validated here: nothing bad reaches a step). Raises QueueFull, RequestError,
        SamplingError."""
        params.validate()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise RequestError("prompt: empty (at least one token is needed)")
        vocab = self.model.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt: token id {bad} outside the model's vocabulary [0, {vocab})")
        if len(ids) >= self.max_context:
            raise RequestError(f"prompt: {len(ids)} tokens, the context holds {self.max_context} "
                               "(shorten it, or ask for truncation)")
        if len(ids) + params.max_tokens > self.max_context:
            raise RequestError(f"max_tokens: {params.max_tokens} new tokens after a {len(ids)}-token prompt exceed "
                               f"the context of {self.max_context} tokens (at most {self.max_context - len(ids)})")
        need = self._pages(len(ids) + params.max_tokens)
        if need > self.cache_pages:
            raise RequestError(f"max_tokens: prompt + max_tokens = {len(ids) + params.max_tokens} tokens need "
                               f"{need} KV pages, the cache has {self.cache_pages} (lower max_tokens)")
        use_ngram = params.ngram_lambda > 0 or bool(params.ngram_lambda_by_length)
        if use_ngram and self.ngram is None:
            raise RequestError("ngram_lambda: this decoder has no n-gram index attached")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the decoder's queue is full ({self.max_waiting} requests waiting); retry later")
        if use_ngram:
            infgram = InfgramState(self.ngram, vocab_size=_vocab_size(self.ngram)).start(ids)
        else:
            infgram = None
        req = Request(self._next_id, ids, params, TextStream(self.tokenizer, ids, params, self.eos_token_id),
                      make_generator(params, self.model.device), infgram)
        req.queued_steps = self.steps
        self._next_id += 1
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop the request; its pages go back at the start of the next step."""
        req.cancelled = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def cache_pages(self) -> int:
        """Pages requests may use (the graphs' scratch page excluded)."""
        return self.cache.num_pages - (1 if self.graphs is not None else 0)

    def load(self) -> dict:
        now = time.perf_counter()
        while self._recent and now - self._recent[0][0] > 5.0:
            self._recent.popleft()
        span = now - self._recent[0][0] if self._recent else 0.0
        rate = sum(n for _, n in self._recent) / span if span > 0 else 0.0
        return {"running": len(self.running), "waiting": len(self.waiting), "max_waiting": self.max_waiting,
                "kv_pages_total": self.cache_pages, "kv_pages_free": self.unreserved_pages(), "tokens_per_s": rate}

    # ---- one step --------------------------------------------------------------------------------------
    def _pages(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.cache.page_size)

    def unreserved_pages(self) -> int:
        """Free pages not promised to a running request."""
        promised = sum(self._pages(r.total_tokens) - len(self.cache.pages.get(r.id, ())) for r in self.running)
        return self.cache.free_pages - promised

    def _retire(self, req: Request, reason: str) -> None:
        req.finish_reason = req.finish_reason or reason
        req.finished_at = time.perf_counter()
        self.cache.free(req.id)
        if req in self.running:
            self.running.remove(req)

    def _admit(self) -> list[Event]:
        events = []
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._retire(req, "cancelled")
            events.append(Event(req, [], "", [], "cancelled"))
        for req in [r for r in self.running if r.cancelled]:
            self._retire(req, "cancelled")
            events.append(Event(req, [], "", [], "cancelled"))
        free = self.unreserved_pages()
        while self.waiting and len(self.running) < self.max_running:
            need = self._pages(self.waiting[0].total_tokens)
            if need > free:
                break
            req = self.waiting.popleft()
            free -= need
            req.admitted_step = self.steps
            req.queued_steps = self.steps - req.queued_steps   # held the step it arrived in until now
            self.running.append(req)
        return events

    def _plan(self) -> tuple[list[Request], list[int], list[int], list[bool]]:
        """(requests, their input tokens concatenated, counts, whether each row is sampled this step)."""
        rows, tokens, counts, sampled = [], [], [], []
        budget = self.step_tokens
        for r in self.running:                       # decodes first: one token each
            if r.pending is not None:
                rows.append(r), tokens.append(r.pending), counts.append(1), sampled.append(True)
                budget -= 1
        for r in self.running:                       # then prompt chunks, oldest first, while the budget lasts
            left = len(r.prompt_ids) - r.prefilled
            if r.pending is None and left > 0 and budget > 0:
                n = min(left, budget)
                rows.append(r), counts.append(n), sampled.append(n == left)
                tokens.extend(r.prompt_ids[r.prefilled:r.prefilled + n])
                budget -= n
        return rows, tokens, counts, sampled

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit, run one forward, sample, and return this step's events (one per request that got a token,
        finished, or was cancelled)."""
        events = self._admit()
        rows, tokens, counts, sampled = self._plan()
        self.steps += 1
        if not rows:
            return events
        dev = self.model.device
        ids = [r.id for r in rows]
        if self.graphs is not None and all(c == 1 for c in counts) and self.graphs.fits(self.cache, ids):
            logits = self.graphs.step(ids, tokens)                            # [B, V]
        else:
            batch, pos = prepare_step(self.cache, ids, counts)
            last = torch.tensor([sum(counts[:i + 1]) - 1 for i in range(len(rows))], device=dev)
            logits = self.model(torch.tensor(tokens, dtype=torch.int64, device=dev), pos, batch, self.cache,
                                logits_at=last)                               # [B, V]
        for r, c, s in zip(rows, counts, sampled):
            if r.pending is None:
                r.prefilled += c
        keep = [i for i, s in enumerate(sampled) if s]
        if not keep:
            return events
        rows = [rows[i] for i in keep]
        logits = logits[torch.tensor(keep, device=logits.device)] if len(keep) != logits.shape[0] else logits
        events += self._sample(rows, logits)
        return events

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> list[Event]:
        params = [r.params for r in rows]
        prev = None
        if any(p.repetition_penalty != 1 for p in params):
            prev = [torch.tensor(r.prompt_ids + r.output_ids, device=logits.device) for r in rows]
        mix = None
        if any(r.infgram is not None for r in rows):
            ntds = [r.infgram.ntd if r.infgram else None for r in rows]
            lams = [r.params.lambda_for(r.infgram.suffix_len) if r.infgram else 0.0 for r in rows]
            mix = lambda p: mix_batch(p, ntds, lams)
        out = sample(logits, params, [r.generator for r in rows], prev, mix)
        toks, lps = out.tokens.tolist(), out.logprobs.tolist()
        now = time.perf_counter()
        self._recent.append((now, len(rows)))
        events = []
        for r, t, lp in zip(rows, toks, lps):
            r.first_token_at = r.first_token_at or now
            r.output_ids.append(t)
            text, reason = r.stream.push(t)
            if reason is None and len(r.prompt_ids) + len(r.output_ids) >= self.max_context:
                reason = "length"
                text += r.stream.stops.flush()
            events.append(Event(r, [t], text, [lp], reason))
            if reason is not None:
                self._retire(r, reason)
            else:
                r.pending = t
                if r.infgram is not None:
                    r.infgram.append(t)
        return events

    def run(self) -> list[Event]:
        """Step until every request has finished; all events in order (tests, the CLI)."""
        events = []
        while self.has_work():
            events += self.step()
        return events


def _vocab_size(engine) -> int | None:
    v = getattr(engine, "vocab_size", None)
    if v is None and hasattr(engine, "info"):
        v = int(engine.info()[0]["vocab_size"])
    return v


def new_cache_for(model: Transformer, budget_bytes: int | None = None, page_size: int = 64) -> KVCache:
    """A KV cache sized by a memory budget: default 1 GiB on CPU, 40% of the GPU's free memory on CUDA."""
    if budget_bytes is None:
        if model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            budget_bytes = int(free * 0.4)
        else:
            budget_bytes = 1 << 30
    return KVCache.for_budget(model.config, budget_bytes, page_size, model.dtype, model.device)
