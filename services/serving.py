"""A gRPC server for any resource: grpcio asyncio server, health checking (NOT_SERVING until the resource is
loaded), reflection, deadlines and cancellation, error mapping, size and concurrency limits, API keys, TLS,
Prometheus metrics, structured logs, graceful shutdown on SIGTERM, and Session streams of small calls.

A service is a `Service` subclass naming its protobuf service descriptor, with a `load()` (its engine, index,
model: slow, run while health says NOT_SERVING) and one method per RPC, of the same name, taking (request
message, CallContext). A method is one of three kinds, told apart by how it is defined:

    def Count(self, request, ctx):            # sync: runs on a worker thread (the engines release the GIL),
        return pb.CountResponse(...)           #   or on the event loop when `inline` says the call is tiny;
                                              #   a sync server-streaming method is a generator, also on threads
    async def Relay(self, request, ctx):      # async: runs on the event loop (a gateway awaiting other services)
        return await ...
    async def Generate(self, request, ctx):   # async generator: a server-streaming method on the event loop
        async for token in ...:                #   (a decoder streaming tokens)
            yield pb.GenerateEvent(...)

When the client cancels or the deadline passes, an async method gets CancelledError where it awaits, and an
async generator is closed (CancelledError where it awaits, GeneratorExit at its `yield`): put clean-up in
`finally`. Sync methods call `ctx.check()` between blocks of work. Everything else (parsing, limits,
errors, metrics, logs, sessions, drain) is done here, once, for every method. Hosting a service:
`serve([svc], ServeConfig(...))`, or `retrogram serve NAME` once it is in the registry (registry.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .grpc_env import (  # noqa: I001 - first: chooses grpc's socket I/O before grpc is imported (see there)
    API_KEY_ENV,
    API_KEY_HEADER,
    CODE_BY_NAME,
    DEFAULT_MAX_MESSAGE_BYTES,
    SESSION_METHOD,
)

import grpc  # noqa: E402
from google.protobuf import message as _message
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ..index.errors import UserError
from ..index.handle import Index
from ..protos import common_pb2 as cpb

log = logging.getLogger("retrogram.services")

DEFAULT_MAX_CONCURRENT_RPCS = 256
HEALTH_EXEMPT = "/grpc.health.v1.Health/"


# ----------------------------------------------------------------------------------------------- errors

class RequestError(Exception):
    """A request the server refuses, with the gRPC status to answer and a message saying what was wrong."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message)


def too_large(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a client sees for an exception raised while answering a call.

    An engine's error class may name its status with a `grpc_code` attribute ("NOT_FOUND", ...);
    otherwise a UserError that is also a LookupError (or is named *NotFound*) is NOT_FOUND, one named
    *Limit*/*TooLarge*/*Exhausted* is RESOURCE_EXHAUSTED, and any other UserError (or ValueError from
    input checks) is INVALID_ARGUMENT."""
    if isinstance(exc, RequestError):
        return exc.code, exc.message
    named = getattr(exc, "grpc_code", None)
    if isinstance(named, str) and named.upper() in CODE_BY_NAME:
        return CODE_BY_NAME[named.upper()], str(exc)
    if isinstance(exc, UserError):
        cls = type(exc).__name__.lower()
        if isinstance(exc, LookupError) or "notfound" in cls:
            return grpc.StatusCode.NOT_FOUND, str(exc)
        if any(w in cls for w in ("limit", "toolarge", "exhausted")):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory answering this request; send a smaller one"
    if isinstance(exc, _message.DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {exc}"
    return grpc.StatusCode.INTERNAL, ""


# ---------------------------------------------------------------------------------------------- context

class CallContext:
    """What a service method sees of its call: the deadline and whether the client went away.
    Long methods call `check()` between blocks of work; it raises when there is no point going on."""

    __slots__ = ("method", "deadline", "cancelled", "peer")

    def __init__(self, method: str, time_remaining: float | None, peer: str = ""):
        self.method = method
        self.deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self.cancelled = False
        self.peer = peer

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        if self.cancelled:
            raise RequestError(grpc.StatusCode.CANCELLED, f"{self.method}: cancelled by the client")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.method}: deadline exceeded")


# ---------------------------------------------------------------------------------------------- service

def server_version() -> str:
    try:
        from importlib.metadata import version

        return version("retrogram")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return ""


class Service:
    """Base of every servicer: one resource to load, and one method per RPC (see the module docstring for
    the three kinds of method).

    Subclasses set `name` (the registry's, the metrics' and the logs' name), `descriptor` (the protobuf
    ServiceDescriptor) and `kind` (what load() loads: "index", "model", ...), and implement:
      check()   fast, before the port is bound: raise UserError naming what cannot be served
      load()    slow: open the engine, load the model. `def`: on a worker thread; `async def`: on the event
                loop (a gateway connecting to its backends). Until it returns, health says NOT_SERVING and
                calls are refused with UNAVAILABLE ("still loading").
      close()   on shutdown, once the calls in flight are done (`def` or `async def`)
      describe() what is loaded, for logs and messages (an index's directory)
    `retrogram serve NAME` makes one with `from_args(args)` (the parsed `serve` arguments)."""

    name: str = ""
    descriptor: Any = None   # google.protobuf.descriptor.ServiceDescriptor
    kind: str = "resource"
    # method -> predicate on the request: true when the call is so small (a few microseconds of compiled
    # engine work) that handing it to a worker thread would cost more than the work; such calls run on the
    # event loop. Every other sync call runs on the worker threads.
    inline: dict[str, Callable[[Any], bool]] = {}

    def __init__(self):
        self.ready = False

    @classmethod
    def from_args(cls, args) -> "Service":
        return cls()

    def describe(self) -> str:
        return ""

    def check(self) -> None:
        pass

    def load(self) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def full_name(self) -> str:
        return self.descriptor.full_name


class IndexService(Service):
    """A service over one index directory (`retrogram serve NAME --index DIR`): an `Index` (retrogram.index),
    or its directory, which `open_index` opens once for check() and load() together."""

    kind = "index"

    def __init__(self, index: Index | Path | str):
        super().__init__()
        self.index: Index | None = index if isinstance(index, Index) else None
        self.index_dir = self.index.dir if self.index is not None else Path(index)

    def open_index(self, stage: str) -> Index:
        """The index (opened on first use, its manifest read once), after checking it has `stage`."""
        if self.index is None:
            self.index = Index.open(self.index_dir)
        self.index.require(stage)
        return self.index

    @classmethod
    def from_args(cls, args) -> "IndexService":
        return cls(args.index)

    def describe(self) -> str:
        return str(self.index_dir)

    def check(self) -> None:
        """Raise UserError naming the file when the index cannot be served."""


# ---------------------------------------------------------------------------------------------- metrics

class _Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("retrogram_rpc_requests", "RPCs answered, by service, method and status code",
                                ["service", "method", "code"], registry=self.registry)
        self.latency = Histogram("retrogram_rpc_latency_seconds", "RPC latency on the server, by service and method",
                                 ["service", "method"], registry=self.registry,
                                 buckets=(5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2,
                                          0.5, 1, 2, 5, 10, 30))
        self.in_flight = Gauge("retrogram_rpc_in_flight", "RPCs being answered", ["service"], registry=self.registry)
        # named for the first resources served (indexes); any service's load() sets them
        self.loaded = Gauge("retrogram_index_loaded", "1 once the service's resource (index, model) is loaded",
                            ["service"], registry=self.registry)
        self.load_seconds = Gauge("retrogram_index_load_seconds", "time taken to load the service's resource",
                                  ["service"], registry=self.registry)


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()


def metrics() -> _Metrics:
    """The process's metrics (one registry per process, shared by the services it hosts)."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = _Metrics()
        return _metrics


# ---------------------------------------------------------------------------------------------- logging

class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event (the message) and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
             "event": record.getMessage()}
        d.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            d["traceback"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(d, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("retrogram")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _log(level: int, event: str, **fields) -> None:
    if log.isEnabledFor(level):
        log.log(level, event, extra={"fields": fields})


# ----------------------------------------------------------------------------------------------- config

@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 0
    api_keys: tuple[str, ...] = ()
    insecure_no_auth: bool = False          # allow binding beyond loopback without API keys
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None       # require client certificates signed by this CA (mTLS)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
    threads: int = 0                        # engine worker threads (0: number of cores)
    grace_s: float = 30.0
    metrics_port: int | None = None
    access_log: bool = False
    inline_small_calls: bool = True         # see Service.inline
    # pin the event loop and grpc's completion-queue thread to this CPU (engine threads stay on every CPU):
    # the two hand every call to each other, and a wake-up on the same core is cheaper than one across
    # cores (~70 µs p50 off a loopback round trip on the 2-core box; bench/results/services.json, latency_variants)
    io_cpu: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def load_api_keys(path: Path | None) -> tuple[str, ...]:
    """API keys from a file (one per line, # comments) and the RETROGRAM_API_KEY variable (comma-separated)."""
    keys = [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"--api-key-file {path}: {e.strerror or e}") from None
        keys += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise UserError(f"--api-key-file {path}: no key in the file")
    return tuple(dict.fromkeys(keys))


def validate_config(config: ServeConfig) -> None:
    if not (0 <= config.port <= 65535):
        raise UserError(f"--port {config.port}: expected 0..65535")
    if not is_loopback(config.host) and not config.api_keys and not config.insecure_no_auth:
        raise UserError(f"--host {config.host} is reachable from other machines: give API keys "
                        f"(--api-key-file FILE or ${API_KEY_ENV}), or --insecure-no-auth to serve without them")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together")
    for p in (config.tls_cert, config.tls_key, config.tls_client_ca):
        if p is not None and not Path(p).is_file():
            raise UserError(f"{p}: no such file")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise UserError("--tls-client-ca needs --tls-cert and --tls-key")
    if config.max_message_bytes < 1024:
        raise UserError(f"--max-message-bytes {config.max_message_bytes}: expected at least 1024")
    if config.max_concurrent_rpcs < 1:
        raise UserError(f"--max-concurrent-rpcs {config.max_concurrent_rpcs}: expected a positive number")
    if config.io_cpu is not None:
        cpus = _cpus()
        if cpus is None:
            raise UserError("--io-cpu: this system cannot pin threads to CPUs")
        if config.io_cpu not in cpus:
            raise UserError(f"--io-cpu {config.io_cpu}: not one of this process's CPUs {sorted(cpus)}")


def _cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _set_thread_cpus(cpus: set[int] | None) -> None:
    """Set the calling thread's CPUs (Linux: pid 0 is the calling thread); threads it starts inherit them."""
    if cpus:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setaffinity(0, cpus)


# ------------------------------------------------------------------------------------------ interceptor

class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health checks must carry one of the keys in the `x-api-key` metadata (or as
    `authorization: Bearer KEY`); others are refused with UNAUTHENTICATED."""

    def __init__(self, keys: tuple[str, ...]):
        import hmac

        self._keys = tuple(k.encode() for k in keys)
        self._compare = hmac.compare_digest

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"missing or wrong API key: send it in the '{API_KEY_HEADER}' metadata")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def _ok(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == API_KEY_HEADER or key == "authorization":
                v = value.decode() if isinstance(value, bytes) else value
                if key == "authorization":
                    if not v.lower().startswith("bearer "):
                        continue
                    v = v[7:].strip()
                vb = v.encode()
                if any(self._compare(vb, k) for k in self._keys):
                    return True
        return False

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(HEALTH_EXEMPT) or self._ok(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        return self._deny


# ------------------------------------------------------------------------------------------------ server

_END = object()


def _next_or_end(it: Iterator) -> Any:
    try:
        return next(it)
    except StopIteration:
        return _END


def _parse(cls, raw: bytes):
    msg = cls.FromString(raw)
    size = msg.ByteSize()
    msg.DiscardUnknownFields()
    if msg.ByteSize() != size:
        raise invalid(f"the request has fields that {cls.DESCRIPTOR.full_name} does not define "
                      "(a client built from newer protos?)")
    return msg


@contextlib.asynccontextmanager
async def _deadline(ctx: CallContext):
    """Cancel the awaits inside at the call's deadline, then answer DEADLINE_EXCEEDED. (grpc cancels a call
    whose deadline passed too, but not a Session message's, which has its own.)"""
    if ctx.deadline is None:
        yield
        return
    loop = asyncio.get_running_loop()
    scope = asyncio.timeout_at(loop.time() + (ctx.deadline - time.monotonic()))
    try:
        async with scope:
            yield
    except TimeoutError:
        if scope.expired():
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{ctx.method}: deadline exceeded") from None
        raise


class _CallScope:
    """One unary or server-streaming call's bookkeeping around its handler: the in-flight counts, the status
    an error answers (logged, through Server._fail), the metrics and the access log."""

    __slots__ = ("server", "svc", "method", "context", "in_flight", "peer", "t0", "code", "ctx")

    def __init__(self, server: "Server", svc: Service, method: str, context, in_flight):
        self.server, self.svc, self.method, self.context, self.in_flight = server, svc, method, context, in_flight
        self.ctx: CallContext | None = None   # set by the handler once the call is admitted

    async def __aenter__(self) -> "_CallScope":
        self.t0 = time.perf_counter()
        self.code = grpc.StatusCode.OK
        # the peer is read now: a call's context must not be touched once the call is over
        self.peer = self.context.peer() if self.server.config.access_log else ""
        self.in_flight.inc()
        self.server._in_flight += 1
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None or issubclass(exc_type, grpc.aio.AbortError):
                return False
            if issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):   # the client went away
                self.code = grpc.StatusCode.CANCELLED
                if self.ctx is not None:
                    self.ctx.cancelled = True
                return False
            if issubclass(exc_type, Exception):   # every error becomes a status
                self.code = status_for(exc)[0]
                await self.server._fail(self.context, self.svc, self.method, exc)   # raises AbortError
            return False
        finally:
            self.in_flight.dec()
            self.server._in_flight -= 1
            self.server._observe(self.svc, self.method, self.code, self.t0, self.peer)


class Server:
    """One grpc.aio server hosting some services on one address."""

    def __init__(self, services: list[Service], config: ServeConfig):
        self.services = services
        self.config = config
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._all_cpus = _cpus()
        # engine threads run on every CPU even when the event loop that starts them is pinned (io_cpu)
        self._executor = ThreadPoolExecutor(max_workers=config.threads or os.cpu_count() or 2,
                                            thread_name_prefix="retrogram-rpc",
                                            initializer=_set_thread_cpus, initargs=(self._all_cpus,))
        self._metrics = metrics()
        self._children: dict = {}
        self._in_flight = 0
        self._stopping = False
        self._sessions: dict[asyncio.Task, list[bool]] = {}
        # each open session holds one of the server's concurrent-call slots for as long as it is open
        self._max_sessions = max(1, config.max_concurrent_rpcs // 2)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- handlers

    def _handlers(self, svc: Service) -> grpc.GenericRpcHandler:
        """The service's methods by kind: sync (worker threads), async (event loop), async generator
        (server streaming on the event loop), sync generator (server streaming on worker threads)."""
        handlers, runners = {}, {}
        session = None
        for m in svc.descriptor.methods:
            if m.name == SESSION_METHOD and m.client_streaming and m.server_streaming:
                session = m
                continue
            fn = getattr(svc, m.name, None)
            if fn is None:
                continue
            req_cls = message_factory.GetMessageClass(m.input_type)
            if m.client_streaming:
                raise TypeError(f"{m.full_name}: client streaming is not supported")
            is_async, is_agen = inspect.iscoroutinefunction(fn), inspect.isasyncgenfunction(fn)
            if m.server_streaming:
                if is_async:
                    raise TypeError(f"{m.full_name} streams: write {type(svc).__name__}.{m.name} as a generator "
                                    "(def ... yield) or an async generator (async def ... yield)")
                make = self._async_stream if is_agen else self._stream
                handlers[m.name] = grpc.unary_stream_rpc_method_handler(make(svc, m.name, fn, req_cls))
            else:
                if is_agen or inspect.isgeneratorfunction(fn):
                    raise TypeError(f"{m.full_name} is unary: {type(svc).__name__}.{m.name} must return its "
                                    "response, not yield")
                make = self._async_runner if is_async else self._runner
                runners[m.name] = make(svc, m.name, fn, req_cls)
                handlers[m.name] = grpc.unary_unary_rpc_method_handler(self._unary(svc, m.name, runners[m.name]))
        if session is not None:
            handlers[session.name] = grpc.stream_stream_rpc_method_handler(self._session(svc, runners))
        return grpc.method_handlers_generic_handler(svc.full_name, handlers)

    def _begin(self, svc: Service, method: str, context) -> CallContext:
        if self._stopping:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{svc.name} server is shutting down")
        if not svc.ready:
            what = " ".join(filter(None, (svc.kind, svc.describe())))
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"{svc.name} server is still loading its {what}; retry shortly")
        return CallContext(f"{svc.descriptor.name}.{method}", context.time_remaining())

    def _status(self, context, svc: Service, method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """The status a failed call answers, logged (an unexpected error with a reference to quote)."""
        code, msg = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            ref = uuid.uuid4().hex[:12]
            log.error("rpc_internal_error", exc_info=exc,
                      extra={"fields": {"service": svc.name, "method": method, "ref": ref, "peer": context.peer()}})
            msg = f"internal error in {svc.descriptor.name}.{method} (server log reference {ref})"
        else:
            _log(logging.INFO, "rpc_error", service=svc.name, method=method, code=code.name, message=msg)
        return code, msg

    async def _fail(self, context, svc: Service, method: str, exc: BaseException) -> grpc.StatusCode:
        code, msg = self._status(context, svc, method, exc)
        await context.abort(code, msg)
        return code  # not reached: abort raises

    def _observe(self, svc: Service, method: str, code: grpc.StatusCode, t0: float, peer: str) -> None:
        dt = time.perf_counter() - t0
        key = (svc.name, method, code)
        children = self._children.get(key)
        if children is None:
            m = self._metrics
            children = self._children[key] = (m.requests.labels(svc.name, method, code.name),
                                               m.latency.labels(svc.name, method))
        children[0].inc()
        children[1].observe(dt)
        if self.config.access_log:
            _log(logging.INFO, "rpc", service=svc.name, method=method, code=code.name, ms=round(dt * 1e3, 3),
                 peer=peer)

    def _runner(self, svc: Service, method: str, fn: Callable, req_cls):
        """`async run(raw request, CallContext) -> raw response` for one unary method: parse, then the
        method on the event loop (small calls) or on a worker thread."""
        loop_run = None
        small = svc.inline.get(method) if self.config.inline_small_calls else None
        executor = self._executor

        def call(req, ctx):
            return fn(req, ctx).SerializeToString()

        async def run(raw: bytes, ctx: CallContext) -> bytes:
            nonlocal loop_run
            req = _parse(req_cls, raw)
            if small is not None and small(req):
                return call(req, ctx)   # microseconds of engine work: less than a hop to a thread
            if loop_run is None:
                loop_run = asyncio.get_running_loop().run_in_executor
            return await loop_run(executor, call, req, ctx)

        return run

    def _async_runner(self, svc: Service, method: str, fn: Callable, req_cls):
        """`async run(raw request, CallContext) -> raw response` for one async method, on the event loop.
        Its deadline (the call's, or a session message's) cancels it where it awaits."""

        async def run(raw: bytes, ctx: CallContext) -> bytes:
            req = _parse(req_cls, raw)
            async with _deadline(ctx):
                return (await fn(req, ctx)).SerializeToString()

        return run

    def _unary(self, svc: Service, method: str, run):
        in_flight = self._metrics.in_flight.labels(svc.name)

        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            async with _CallScope(self, svc, method, context, in_flight) as call:
                call.ctx = self._begin(svc, method, context)
                return await run(raw, call.ctx)

        return handler

    # Streaming handlers write each message with context.write from the call's own task (rather than
    # being async generators that grpc iterates): a client's cancel or the deadline then raises
    # CancelledError right here, so the method is closed and the call accounted for at once, not
    # whenever grpc's abandoned generator is finalized.

    def _stream(self, svc: Service, method: str, fn: Callable, req_cls):
        """A sync server-streaming method: its generator runs on the worker threads, a few messages a hop."""
        executor = self._executor
        in_flight = self._metrics.in_flight.labels(svc.name)

        def start(req, ctx):
            return iter(fn(req, ctx))

        def step(it):
            """The next few messages, serialized (one hop to the thread for up to 16 of them / 256 KiB)."""
            out, size = [], 0
            while len(out) < 16 and size < (256 << 10):
                item = _next_or_end(it)
                if item is _END:
                    return out, True
                b = item.SerializeToString()
                out.append(b)
                size += len(b)
            return out, False

        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> None:
            loop = asyncio.get_running_loop()
            async with _CallScope(self, svc, method, context, in_flight) as call:
                ctx = call.ctx = self._begin(svc, method, context)
                req = _parse(req_cls, raw)
                it = await loop.run_in_executor(executor, start, req, ctx)
                done = False
                while not done:
                    ctx.check()
                    items, done = await loop.run_in_executor(executor, step, it)
                    for item in items:
                        await context.write(item)

        return handler

    def _async_stream(self, svc: Service, method: str, fn: Callable, req_cls):
        """An async-generator server-streaming method, on the event loop. It is always closed: finished, or
        cancelled where it awaits (client cancel, deadline), or closed at its yield (aclose) when the call
        ends while a message is being written."""
        in_flight = self._metrics.in_flight.labels(svc.name)

        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> None:
            async with _CallScope(self, svc, method, context, in_flight) as call:
                ctx = call.ctx = self._begin(svc, method, context)
                agen = fn(_parse(req_cls, raw), ctx)
                try:
                    while True:
                        async with _deadline(ctx):
                            try:
                                item = await agen.__anext__()
                            except StopAsyncIteration:
                                return
                        await context.write(item.SerializeToString())
                finally:
                    await agen.aclose()

        return handler

    def _session(self, svc: Service, runners: dict):
        """A Session stream: each message names a unary method and carries its request; the answers go
        back in order, an error answering only its own call. Every message counts as a call of its
        method (in-flight accounting, metrics, logs), so shutdown drains sessions like unary calls."""
        in_flight = self._metrics.in_flight.labels(svc.name)
        access_log = self.config.access_log
        service = svc.descriptor.name
        known = ", ".join(sorted(runners))

        async def handler(request_iterator, context: grpc.aio.ServicerContext):
            try:
                self._begin(svc, SESSION_METHOD, context)
                if len(self._sessions) >= self._max_sessions:
                    raise too_large(f"{svc.name} server: {len(self._sessions)} sessions open, its limit; "
                                    "make unary calls instead")
            except RequestError as e:
                await context.abort(e.code, e.message)
            peer = context.peer() if access_log else ""
            task = asyncio.current_task()
            busy = self._sessions[task] = [False]   # idle sessions are cancelled when the server stops
            try:
                while True:
                    try:
                        raw = await context.read()
                    except asyncio.CancelledError:
                        if self._stopping:   # stop() ended this idle session: tell the client (grpc would not)
                            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{svc.name} server is shutting down")
                        raise
                    if raw is grpc.aio.EOF:
                        return
                    busy[0] = True
                    t0 = time.perf_counter()
                    in_flight.inc()
                    self._in_flight += 1
                    method, call_id = SESSION_METHOD, 0
                    try:
                        msg = _parse(cpb.SessionRequest, raw)
                        method, call_id = msg.method, msg.id
                        run = runners.get(method)
                        if run is None:
                            raise invalid(f"Session: {method!r} is not a unary method of {service} "
                                          f"(expected one of {known})")
                        ctx = CallContext(f"{service}.{method}", msg.timeout_s if msg.HasField("timeout_s") else None)
                        out = cpb.SessionResponse(id=call_id, response=await run(msg.request, ctx))
                        code = grpc.StatusCode.OK
                    except asyncio.CancelledError:
                        code = grpc.StatusCode.CANCELLED
                        raise
                    except Exception as e:  # noqa: BLE001 - every error becomes that call's status
                        code, message = self._status(context, svc, method, e)
                        out = cpb.SessionResponse(id=call_id, code=code.value[0], message=message)
                    finally:
                        in_flight.dec()
                        self._in_flight -= 1
                        self._observe(svc, method, code, t0, peer)
                    await context.write(out.SerializeToString())
                    busy[0] = False
                    if self._stopping:
                        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{svc.name} server is shutting down")
            finally:
                self._sessions.pop(task, None)

        return handler

    # -- lifecycle

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING); returns the bound port."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0),
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.min_ping_interval_without_data_ms", 5000)]
        interceptors = [ApiKeyInterceptor(cfg.api_keys)] if cfg.api_keys else []
        if cfg.io_cpu is not None:   # before the server: grpc's poller thread inherits the loop thread's CPUs
            _set_thread_cpus({cfg.io_cpu})
        server = grpc.aio.server(interceptors=interceptors, options=options,
                                 maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        server.add_generic_rpc_handlers([self._handlers(s) for s in self.services])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [s.full_name for s in self.services] + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                                         reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        for s in self.services:
            await self._health.set(s.full_name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            if cfg.tls_cert is not None:
                creds = grpc.ssl_server_credentials(
                    [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                    root_certificates=Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None,
                    require_client_auth=cfg.tls_client_ca is not None)
                port = server.add_secure_port(cfg.address, creds)
            else:
                port = server.add_insecure_port(cfg.address)
        except RuntimeError:   # grpc's "Failed to bind to address ..."
            port = 0
        if not port:
            raise UserError(f"cannot listen on {cfg.address} (address in use or not available)")
        await server.start()
        self._server = server
        self.port = port
        if cfg.metrics_port is not None:
            from prometheus_client import start_http_server

            try:
                start_http_server(cfg.metrics_port, addr=cfg.host.strip("[]"), registry=self._metrics.registry)
            except OSError as e:
                await server.stop(0)
                self._server = None
                raise UserError(f"--metrics-port {cfg.metrics_port}: cannot serve metrics on "
                                f"{cfg.host}:{cfg.metrics_port} ({e.strerror or e})") from None
        _log(logging.INFO, "listening", services=[s.name for s in self.services], address=self.address,
             tls=cfg.tls_cert is not None, api_keys=len(cfg.api_keys), metrics_port=cfg.metrics_port,
             io_cpu=cfg.io_cpu)
        return port

    @property
    def address(self) -> str:
        host = self.config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    async def load(self) -> None:
        """Load every service's resource (`def load`: on a worker thread; `async def load`: on the loop);
        health turns SERVING for each as it is ready."""
        for s in self.services:
            t0 = time.perf_counter()
            await self._run_hook(s.load)
            s.ready = True
            dt = time.perf_counter() - t0
            self._metrics.loaded.labels(s.name).set(1)
            self._metrics.load_seconds.labels(s.name).set(dt)
            await self._health.set(s.full_name, health_pb2.HealthCheckResponse.SERVING)
            _log(logging.INFO, f"{s.kind}_loaded", service=s.name, **{s.kind: s.describe()}, seconds=round(dt, 3))
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def _run_hook(self, fn: Callable) -> None:
        if inspect.iscoroutinefunction(fn):
            await fn()
        else:
            await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def in_flight(self) -> int:
        """Calls being answered now (session messages included)."""
        return self._in_flight

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls (UNAVAILABLE, health NOT_SERVING), let the calls in flight finish (up to
        `grace` seconds), then close the server."""
        if self._server is None:
            return
        grace = self.config.grace_s if grace is None else grace
        end = time.monotonic() + grace
        self._stopping = True
        await self._health.enter_graceful_shutdown()
        for task, busy in list(self._sessions.items()):
            if not busy[0]:   # waiting for its next message, which would be refused: end it now
                task.cancel()
        while self._in_flight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.005)
        await self._server.stop(max(0.0, end - time.monotonic()))
        self._executor.shutdown(wait=True, cancel_futures=False)
        for s in self.services:
            with contextlib.suppress(Exception):
                if inspect.iscoroutinefunction(s.close):
                    await s.close()
                else:
                    s.close()
        self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def print_event(event: str, stream=None, **fields) -> None:
    """A line of JSON on stdout for whoever started the server (`retrogram serve`, tests): listening, serving."""
    stream = stream or sys.stdout
    stream.write(json.dumps({"event": event, **fields}) + "\n")
    stream.flush()


async def serve_async(services: list[Service], config: ServeConfig, announce: bool = True) -> int:
    """Run a server until SIGTERM/SIGINT: check the services, bind, announce, load, serve, drain, exit."""
    names = [s.name for s in services]
    try:
        validate_config(config)
        for s in services:
            s.check()
        server = Server(services, config)
        await server.start()
    except UserError as e:   # whoever started this process reads why from the event (`retrogram serve`'s stack)
        if announce:
            print_event("failed", services=names, error=str(e))
        raise
    if announce:
        print_event("listening", services=names, address=server.address, port=server.port,
                    tls=config.tls_cert is not None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    got = {}

    def on_signal(signum):
        got["signal"] = signal.Signals(signum).name
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    failed = None
    loader = asyncio.ensure_future(server.load())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loader, stopper], return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and loader.exception() is not None:
        e = loader.exception()
        code, msg = status_for(e)
        msg = msg or f"{type(e).__name__}: {e}"
        kinds = sorted({s.kind for s in services})
        event = f"{kinds[0] if len(kinds) == 1 else 'resource'}_load_failed"   # index_load_failed, ...
        log.error(event, exc_info=e if code == grpc.StatusCode.INTERNAL else None,
                  extra={"fields": {"services": names, "error": msg}})
        print_event("failed", services=names, error=msg)
        failed = msg
        stop.set()
    elif loader.done():
        if announce:
            print_event("serving", services=names, address=server.address, port=server.port)
    await stop.wait()
    if not loader.done():
        loader.cancel()
    _log(logging.INFO, "shutting_down", signal=got.get("signal"), grace_s=config.grace_s)
    await server.stop()
    _log(logging.INFO, "stopped", services=names)
    if failed is not None:
        raise UserError(failed)   # the CLI prints it on one line, exit 2
    return 0


def serve(services: list[Service], config: ServeConfig, announce: bool = True) -> int:
    return asyncio.run(serve_async(services, config, announce))
