"""Python clients for the retrogram gRPC services, sync and async.

    from retrogram.services.client import NgramClient, RetrieverClient
    ng = NgramClient("127.0.0.1:50051")                 # or several shard servers: ["h1:50051", "h2:50051"]
    ng.count([464, 3290])   -> {"count": 12, "approx": False}
    ng.count("to be or")    -> {"count": 3, "approx": False, "tokens": [...]}   (text: tokenized by the server)
    rt = RetrieverClient("127.0.0.1:50052")
    rt.retrieve("what is a list comprehension?", k=2)  -> [[{"score": ..., "chunk_id": ..., ...}, ...]]

The n-gram client's methods and result dicts are those of `retrogram.ngram.Engine` (infini-gram 2.6.0's
names and fields), so code written against the engine runs against a server: `connect(server)` gives the
object the CLI's `--server HOST:PORT` uses. Given several n-gram servers, each holding some shards of one
index, the client asks them all concurrently and combines the answers as infini-gram combines shards:
counts add; ∞-gram queries take the longest suffix found on any server; documents are sampled across
servers in proportion to their counts; document indexes and shard numbers run across the servers in the
order given.

Small n-gram calls (count, prob, ntd, infgram_prob, infgram_ntd) to one server go over a long-lived Session
stream instead of one gRPC call each (see "sessions" below); `sessions=False` turns that off.

Failures raise `ServiceError` (a UserError: the CLI prints its message) with the gRPC status code.
Calls that find a server unavailable (restarting, still loading its index) are retried with backoff
(every call is a read, so retrying is safe), and channels reconnect on their own after a restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

# grpc core reads GRPC_EXPERIMENTS once, when grpc is first imported, so this runs before `import grpc`
# (serving.py imports this module first for the same reason).
EVENT_ENGINE_ENV = "RETROGRAM_GRPC_EVENT_ENGINE"
LEGACY_IO_EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def _prefer_low_latency_io() -> bool:
    """Route client and listener sockets through grpc core's posix iomgr polling instead of its EventEngine:
    the thread that waits on the completion queue polls the socket itself, one thread hand-off less per call
    in each process (on this 2-core box ~60 µs p50 off a loopback round trip; bench/results/
    services.json, latency_variants). Not done when GRPC_EXPERIMENTS is already set, when grpc was imported before
    this module, or with RETROGRAM_GRPC_EVENT_ENGINE=1."""
    import sys

    if "grpc" in sys.modules or os.environ.get(EVENT_ENGINE_ENV, "") not in ("", "0"):
        return False
    if "GRPC_EXPERIMENTS" in os.environ:
        return False
    os.environ["GRPC_EXPERIMENTS"] = LEGACY_IO_EXPERIMENTS   # inherited by servers started from here
    return True


LOW_LATENCY_IO = _prefer_low_latency_io()

import grpc  # noqa: E402 - after the I/O choice above

from ..index.errors import UserError
from ..protos import common_pb2 as cpb
from ..protos import ngram_pb2 as npb
from ..protos import ngram_pb2_grpc as ngrpc
from ..protos import retriever_pb2 as rpb
from ..protos import retriever_pb2_grpc as rgrpc

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
API_KEY_HEADER = "x-api-key"

_RETRY_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "retrogram.v1.NgramService"}, {"service": "retrogram.v1.RetrieverService"}],
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }]})


class ServiceError(UserError):
    """A call a server answered with an error status (or could not be made)."""

    def __init__(self, target: str, method: str, code: grpc.StatusCode | None, details: str):
        self.target = target
        self.method = method
        self.code = code
        self.details = details
        name = code.name if code is not None else "ERROR"
        super().__init__(f"{target} {method}: {details or name} [{name}]")

    @property
    def grpc_code(self) -> str:   # lets a server that calls other servers pass the status on
        return self.code.name if self.code is not None else "UNKNOWN"


def _error(target: str, method: str, e: grpc.RpcError) -> ServiceError:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    if code == grpc.StatusCode.UNAVAILABLE and details and "failed to connect" in details.lower():
        details = f"no server answering at {target} ({details})"
    return ServiceError(target, method, code, details or "")


def parse_target(server: str) -> str:
    """HOST:PORT (or [v6]:PORT, or a grpc URI such as unix:/path) checked for the obvious mistakes."""
    s = server.strip()
    if not s:
        raise UserError("--server: expected HOST:PORT")
    if s.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return s
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
        raise UserError(f"--server {server!r}: expected HOST:PORT (e.g. 127.0.0.1:50051)")
    return s


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: bool = True) -> list:
    opts = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.keepalive_time_ms", 30000),
            ("grpc.keepalive_timeout_ms", 10000)]
    if retries:
        opts += [("grpc.enable_retries", 1), ("grpc.service_config", _RETRY_CONFIG)]
    else:
        opts += [("grpc.enable_retries", 0)]
    return opts


def make_channel(target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 client_cert: tuple[bytes, bytes] | None = None, aio: bool = False,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: bool = True,
                 server_name: str | None = None):
    """A channel to one server. TLS: `tls=True` (system roots, or `root_certificates` PEM), optionally a
    client certificate (key PEM, cert PEM) for servers that require one."""
    opts = channel_options(max_message_bytes, retries)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    mod = grpc.aio if aio else grpc
    if tls or root_certificates is not None or client_cert is not None:
        key, cert = client_cert if client_cert else (None, None)
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=key,
                                             certificate_chain=cert)
        return mod.secure_channel(target, creds, options=opts)
    return mod.insecure_channel(target, options=opts)


# ------------------------------------------------------------------------------------ proto <-> python

def query_msg(q: Any) -> cpb.Query:
    """A token-id sequence (list/tuple/array of ints) or a text (str) as a Query."""
    if isinstance(q, str):
        return cpb.Query(text=q)
    if isinstance(q, cpb.Query):
        return q
    try:
        ids = [int(x) for x in q]
    except (TypeError, ValueError):
        raise UserError(f"a query is a text (str) or a sequence of token ids, not {type(q).__name__}") from None
    if any(x < 0 or x > 0xFFFFFFFF for x in ids):
        raise UserError("token ids must be in [0, 2**32)")
    return cpb.Query(ids=ids)


def cnf_msg(cnf: Any) -> npb.Cnf:
    """[[seq, seq], [seq]] (AND of ORs of sequences; each seq token ids or text) as a Cnf."""
    if isinstance(cnf, npb.Cnf):
        return cnf
    if isinstance(cnf, str) or not isinstance(cnf, Iterable):
        raise UserError("cnf: expected a list of clauses, each a list of sequences (token ids or text)")
    clauses = []
    for clause in cnf:
        if isinstance(clause, str) or not isinstance(clause, Iterable):
            raise UserError("cnf: each clause is a list of sequences (token ids or text)")
        clauses.append(npb.Disjunction(terms=[query_msg(t) for t in clause]))
    return npb.Cnf(clauses=clauses)


def packed_msg(queries: Sequence[Sequence[int]]) -> cpb.PackedQueries:
    """Many token-id sequences as two flat arrays (a 2-D array or a list of sequences)."""
    try:
        import numpy as np

        if isinstance(queries, np.ndarray) and queries.ndim == 2:
            n, m = queries.shape
            return cpb.PackedQueries(ids=queries.reshape(-1).tolist(), lengths=[m] * n)
    except ImportError:  # pragma: no cover
        pass
    ids: list[int] = []
    lengths = []
    for q in queries:
        seq = q.tolist() if hasattr(q, "tolist") else q
        ids.extend(seq)
        lengths.append(len(seq))
    return cpb.PackedQueries(ids=ids, lengths=lengths)


def doc_dict(d: npb.DocResult, doc_offset: int = 0) -> dict:
    return {"doc_ix": d.doc_ix + doc_offset, "doc_len": d.doc_len, "disp_len": d.disp_len,
            "needle_offset": d.needle_offset, "metadata": d.metadata, "token_ids": list(d.token_ids),
            "blocked": d.blocked}


def _with_tokens(out: dict, q: Any, tokens) -> dict:
    if isinstance(q, str):
        out["tokens"] = list(tokens)
    return out


def _prob(cont: int, prompt: int) -> float:
    return cont / prompt if prompt > 0 else -1.0


def _dist(prompt_cnt: int, counts: dict[int, int]) -> dict[int, dict]:
    total = sum(counts.values()) or 1
    return {t: {"cont_cnt": c, "prob": c / total} for t, c in sorted(counts.items())}


# Each query is a "plan": the RPC to call on every server, the request, and how to combine the answers
# (one per server, in order) into the engine's result dict. The sync and async clients share them.

class _Layout:
    """Where documents and shards of each server start in the combined numbering."""

    def __init__(self, infos: list[cpb.IndexInfo]):
        self.infos = infos
        self.doc_offsets, self.shard_offsets = [], []
        d = s = 0
        for i in infos:
            self.doc_offsets.append(d)
            self.shard_offsets.append(s)
            d += i.num_documents
            s += i.num_shards
        self.num_documents, self.num_shards = d, s

    def by_doc(self, doc_ix: int) -> tuple[int, int]:
        for k in range(len(self.infos) - 1, -1, -1):
            if doc_ix >= self.doc_offsets[k]:
                return k, doc_ix - self.doc_offsets[k]
        return 0, doc_ix

    def by_shard(self, s: int) -> tuple[int, int]:
        for k in range(len(self.infos) - 1, -1, -1):
            if s >= self.shard_offsets[k]:
                return k, s - self.shard_offsets[k]
        return 0, s


def _merge_count(rs: list[npb.CountResponse], q=None) -> dict:
    out = {"count": sum(r.count for r in rs), "approx": any(r.approx for r in rs)}
    return _with_tokens(out, q, rs[0].tokens)


def _merge_count_many(rs: list[npb.CountManyResponse]) -> list[int]:
    if len(rs) == 1:
        return list(rs[0].counts)
    return [sum(c) for c in zip(*(r.counts for r in rs))]


def _merge_prob(rs: list[npb.ProbResponse]) -> dict:
    p = sum(r.prompt_cnt for r in rs)
    c = sum(r.cont_cnt for r in rs)
    if len(rs) == 1:
        return {"prompt_cnt": p, "cont_cnt": c, "prob": rs[0].prob}
    return {"prompt_cnt": p, "cont_cnt": c, "prob": _prob(c, p)}


def _merge_ntd(rs: list[npb.NtdResponse]) -> dict:
    if len(rs) == 1:
        r = rs[0]
        return {"prompt_cnt": r.prompt_cnt,
                "result_by_token_id": {t: {"cont_cnt": v.cont_cnt, "prob": v.prob}
                                       for t, v in sorted(r.result_by_token_id.items())},
                "approx": r.approx}
    counts: dict[int, int] = {}
    for r in rs:
        for t, v in r.result_by_token_id.items():
            counts[t] = counts.get(t, 0) + v.cont_cnt
    return {"prompt_cnt": sum(counts.values()), "result_by_token_id": _dist(0, counts),
            "approx": any(r.approx for r in rs)}


def _longest(rs):
    """∞-gram across servers: the answers of the servers that found the longest suffix (the others
    have count 0 for it, so adding theirs changes nothing)."""
    L = max(r.suffix_len for r in rs)
    return L, [r for r in rs if r.suffix_len == L]


def _merge_infgram_prob(rs: list[npb.InfgramProbResponse]) -> dict:
    if len(rs) == 1:
        r = rs[0]
        return {"prompt_cnt": r.prompt_cnt, "cont_cnt": r.cont_cnt, "prob": r.prob, "suffix_len": r.suffix_len}
    L, top = _longest(rs)
    p = sum(r.prompt_cnt for r in top)
    c = sum(r.cont_cnt for r in top)
    return {"prompt_cnt": p, "cont_cnt": c, "prob": _prob(c, p), "suffix_len": L}


def _merge_infgram_ntd(rs: list[npb.InfgramNtdResponse]) -> dict:
    L, top = _longest(rs)
    out = _merge_ntd(top)
    out["suffix_len"] = L
    return out


def _merge_search(rs: list[npb.SearchDocsResponse], layout: _Layout | None, maxnum: int | None) -> dict:
    if len(rs) == 1:
        r = rs[0]
        return {"cnt": r.cnt, "approx": r.approx, "idxs": list(r.idxs), "documents": [doc_dict(d) for d in r.documents]}
    # Each server sampled its documents uniformly from its own matches; drawing each of the maxnum
    # results from server k with probability cnt_k / cnt reproduces sampling across all shards at once.
    cnts = [r.cnt for r in rs]
    total = sum(cnts)
    out = {"cnt": total, "approx": any(r.approx for r in rs), "idxs": [], "documents": []}
    if total == 0:
        return out
    n = maxnum if maxnum else max(len(r.documents) for r in rs)
    pools = [list(zip(r.idxs, r.documents)) for r in rs]
    cnt_offsets = [sum(cnts[:k]) for k in range(len(rs))]
    rng = random.Random()
    for _ in range(n):
        live = [k for k in range(len(rs)) if pools[k] and cnts[k] > 0]
        if not live:
            break
        k = rng.choices(live, weights=[cnts[k] for k in live])[0]
        idx, d = pools[k].pop(0)
        out["idxs"].append(idx + cnt_offsets[k])
        out["documents"].append(doc_dict(d, layout.doc_offsets[k] if layout else 0))
    return out


def _merge_score(chunks_by_server: list[list[npb.ScoreSequenceChunk]]) -> dict:
    """Columns over all positions; several servers combined position by position like ∞-gram prob."""
    cols = []
    for chunks in chunks_by_server:
        c = {"prob": [], "suffix_len": [], "prompt_cnt": [], "cont_cnt": [], "tokens": []}
        for ch in chunks:
            for key in c:
                c[key].extend(getattr(ch, key))
        cols.append(c)
    if len(cols) == 1:
        return cols[0]
    out = {"prob": [], "suffix_len": [], "prompt_cnt": [], "cont_cnt": [], "tokens": cols[0]["tokens"]}
    for i in range(len(cols[0]["prob"])):
        L = max(c["suffix_len"][i] for c in cols)
        top = [c for c in cols if c["suffix_len"][i] == L]
        p = sum(c["prompt_cnt"][i] for c in top)
        n = sum(c["cont_cnt"][i] for c in top)
        out["suffix_len"].append(L)
        out["prompt_cnt"].append(p)
        out["cont_cnt"].append(n)
        out["prob"].append(_prob(n, p))
    return out


def _opt(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _neighbour(n: rpb.Neighbour) -> dict:
    """A Neighbour message as retrogram.index.Neighbour.to_dict() gives it."""
    d = n.document
    return {"score": n.score, "chunk_id": n.chunk_id, "doc_id": n.doc_id, "token_offset": n.token_offset,
            "tokens": list(n.tokens), "continuation": list(n.continuation), "text": n.text,
            "continuation_text": n.continuation_text,
            "document": {"source": d.source or None, "external_id": d.external_id or None,
                         "metadata": json.loads(d.metadata) if d.metadata else {}}}


def retrieve_query_msg(q: Any, exclude_doc: int | None = None) -> rpb.RetrieveQuery:
    """A text (str), token ids (a list of ints), or an embedding (a float numpy vector, or
    ("embedding", values)); `("ids", [...])` and `("text", "...")` say the kind explicitly."""
    kw = {} if exclude_doc is None else {"exclude_doc": int(exclude_doc)}
    if isinstance(q, rpb.RetrieveQuery):
        return q
    if isinstance(q, str):
        return rpb.RetrieveQuery(text=q, **kw)
    if isinstance(q, tuple) and len(q) == 2 and q[0] in ("embedding", "ids", "text"):
        kind, v = q
        if kind == "embedding":
            return rpb.RetrieveQuery(embedding=rpb.Embedding(values=[float(x) for x in v]), **kw)
        if kind == "ids":
            return rpb.RetrieveQuery(ids=rpb.TokenIds(ids=[int(x) for x in v]), **kw)
        return rpb.RetrieveQuery(text=str(v), **kw)
    dtype = getattr(q, "dtype", None)
    if dtype is not None and getattr(dtype, "kind", "") == "f":
        return rpb.RetrieveQuery(embedding=rpb.Embedding(values=q.tolist()), **kw)
    try:
        return rpb.RetrieveQuery(ids=rpb.TokenIds(ids=[int(x) for x in q]), **kw)
    except (TypeError, ValueError):
        raise UserError(f"a retrieval query is a text, token ids or an embedding, not {type(q).__name__}") from None


# ----------------------------------------------------------------------------------------- sessions
# Small calls made one after another go over one long-lived Session stream per server (protos/common.proto):
# with grpcio a message on an open stream costs about half of a unary call's round trip (no call set-up,
# headers or status per call). A caller that finds its session busy (another thread or task is using it)
# makes a unary call, so concurrency is unchanged. Any failure of the stream itself (server restarting,
# going away, too many sessions, an old server without Session) sends the call again as a unary call, with
# its retries and errors; every call is a read, so sending twice is safe.

SESSION_MIN_TIMEOUT_S = 1.0      # calls with shorter deadlines go unary (the sync watchdog's granularity)
SESSION_RETRY_S = 1.0            # after a session fails, unary calls only for this long
_CLOSE = object()


class _SessionBroken(Exception):
    """The stream failed (not the call): the call may not have been answered."""


def _session_request(call_id: int, method: str, request, timeout: float | None) -> bytes:
    msg = cpb.SessionRequest(id=call_id, method=method, request=request.SerializeToString())
    if timeout is not None:
        msg.timeout_s = timeout
    return msg.SerializeToString()


class _SyncSession:
    """One Session stream to one server, used by one thread at a time (`lock`)."""

    def __init__(self, channel, path: str, metadata):
        self.lock = threading.Lock()
        self.deadline: float | None = None   # when the call in progress must end (the watchdog checks it)
        self.expired = False
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = channel.stream_stream(path)(iter(self._requests.get, _CLOSE), metadata=metadata)
        self._id = 0
        _watchdog.add(self)

    def call(self, method: str, request, timeout: float | None) -> cpb.SessionResponse:
        self._id += 1
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._requests.put(_session_request(self._id, method, request, timeout))
        try:
            raw = next(self._call)
        except (grpc.RpcError, StopIteration) as e:
            raise _SessionBroken(str(e)) from None
        finally:
            self.deadline = None
        return cpb.SessionResponse.FromString(raw)

    def expire(self) -> None:
        self.expired = True
        self._call.cancel()

    def close(self) -> None:
        self._requests.put(_CLOSE)   # ends grpc's thread that sends the requests
        self._call.cancel()


class _Watchdog:
    """Cancels sync session calls past their deadline (a blocked `next()` on a stream takes no timeout)."""

    def __init__(self):
        self._sessions: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, session: _SyncSession) -> None:
        with self._lock:
            self._sessions.add(session)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="retrogram-session-watchdog", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(SESSION_MIN_TIMEOUT_S / 4)
            now = time.monotonic()
            with self._lock:
                sessions = list(self._sessions)
            for s in sessions:
                d = s.deadline
                if d is not None and now > d:
                    s.expire()


_watchdog = _Watchdog()


class _AsyncSession:
    """One Session stream to one server (grpc.aio), used by one task at a time (`lock`)."""

    def __init__(self, channel, path: str, metadata):
        self.lock = asyncio.Lock()
        self.expired = False
        self._call = channel.stream_stream(path)(metadata=metadata)
        self._id = 0

    async def call(self, method: str, request, timeout: float | None) -> cpb.SessionResponse:
        self._id += 1
        try:
            await self._call.write(_session_request(self._id, method, request, timeout))
            if timeout is None:
                raw = await self._call.read()
            else:
                raw = await asyncio.wait_for(self._call.read(), timeout)
        except asyncio.TimeoutError:
            self.expired = True
            raise _SessionBroken("deadline exceeded") from None
        except (grpc.RpcError, asyncio.InvalidStateError) as e:
            raise _SessionBroken(str(e)) from None
        if raw is grpc.aio.EOF:
            raise _SessionBroken("the server ended the session")
        return cpb.SessionResponse.FromString(raw)

    def close(self) -> None:
        self._call.cancel()


_CODE_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def _session_answer(target: str, method: str, resp: cpb.SessionResponse, response_cls):
    if resp.code:
        raise ServiceError(target, method, _CODE_BY_VALUE.get(resp.code, grpc.StatusCode.UNKNOWN), resp.message)
    return response_cls.FromString(resp.response)


def _response_classes(service_descriptor) -> dict:
    from google.protobuf import message_factory

    return {m.name: message_factory.GetMessageClass(m.output_type) for m in service_descriptor.methods}


# -------------------------------------------------------------------------------------------- base

class _Base:
    def __init__(self, targets: str | Sequence[str], *, api_key: str | None = None, timeout: float | None = DEFAULT_TIMEOUT_S,
                 tls: bool = False, root_certificates: bytes | str | Path | None = None,
                 client_cert: tuple[bytes, bytes] | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 retries: bool = True, wait_for_ready: bool = False, server_name: str | None = None, aio: bool = False,
                 sessions: bool = True):
        self.targets = [parse_target(t) for t in ([targets] if isinstance(targets, str) else list(targets))]
        if not self.targets:
            raise UserError("no server given")
        if isinstance(root_certificates, (str, Path)):
            root_certificates = Path(root_certificates).read_bytes()
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.metadata = ((API_KEY_HEADER, api_key),) if api_key else None
        self.channels = [make_channel(t, tls=tls, root_certificates=root_certificates, client_cert=client_cert,
                                      aio=aio, max_message_bytes=max_message_bytes, retries=retries,
                                      server_name=server_name) for t in self.targets]
        self._layout: _Layout | None = None
        # small calls to one server go over a Session stream (see "sessions" above); sessions=False: never
        self.use_sessions = sessions
        self._sessions: list = [None] * len(self.targets)
        self._session_retry_at = [0.0] * len(self.targets)
        self._session_lock = threading.Lock()

    # set by subclasses: the service's full name, the methods sent over a session, response classes
    service_name = ""
    session_methods: frozenset = frozenset()
    response_classes: dict = {}

    def _session_for(self, k: int, method: str, timeout: float | None, make):
        """Server k's session for this call, or None when the call should be a unary one."""
        if not self.use_sessions or method not in self.session_methods:
            return None
        if timeout is not None and timeout < SESSION_MIN_TIMEOUT_S:
            return None
        s = self._sessions[k]
        if s is None:
            if time.monotonic() < self._session_retry_at[k]:
                return None
            with self._session_lock:
                s = self._sessions[k]
                if s is None:
                    s = self._sessions[k] = make(self.channels[k], f"/{self.service_name}/Session", self.metadata)
        return s

    def _session_failed(self, k: int, s, exc: BaseException, method: str, timeout: float | None) -> None:
        """A session call raised: the stream is dropped (a new one next time). A call past its deadline
        raises DEADLINE_EXCEEDED, an interruption (KeyboardInterrupt, cancellation) goes on up; after
        any other stream failure this returns, and the caller sends the call again as a unary one."""
        with self._session_lock:
            if self._sessions[k] is s:
                self._sessions[k] = None
                self._session_retry_at[k] = time.monotonic() + SESSION_RETRY_S
        s.close()
        if not isinstance(exc, _SessionBroken):
            raise exc
        if s.expired:
            raise ServiceError(self.targets[k], method, grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no answer within {timeout} s") from None

    def _close_sessions(self) -> None:
        for k, s in enumerate(self._sessions):
            if s is not None:
                self._sessions[k] = None
                s.close()

    def _kw(self, timeout) -> dict:
        kw = {"timeout": self.timeout if timeout is None else timeout, "metadata": self.metadata}
        if self.wait_for_ready:
            kw["wait_for_ready"] = True
        return kw


class _SyncBase(_Base):
    def _call(self, k: int, method: str, request, timeout=None):
        t = self.timeout if timeout is None else timeout
        s = self._session_for(k, method, t, _SyncSession)
        if s is not None and s.lock.acquire(blocking=False):
            try:
                resp = s.call(method, request, t)
            except BaseException as e:
                self._session_failed(k, s, e, method, t)   # raises, unless the call should go unary
            else:
                return _session_answer(self.targets[k], method, resp, self.response_classes[method])
            finally:
                s.lock.release()
        try:
            return getattr(self.stubs[k], method)(request, **self._kw(timeout))
        except grpc.RpcError as e:
            raise _error(self.targets[k], method, e) from None

    def _call_all(self, method: str, request, timeout=None) -> list:
        if len(self.stubs) == 1:
            return [self._call(0, method, request, timeout)]
        futures = [getattr(s, method).future(request, **self._kw(timeout)) for s in self.stubs]
        out = []
        for k, f in enumerate(futures):
            try:
                out.append(f.result())
            except grpc.RpcError as e:
                for g in futures:
                    g.cancel()
                raise _error(self.targets[k], method, e) from None
        return out

    def _stream(self, k: int, method: str, request, timeout=None) -> list:
        try:
            return list(getattr(self.stubs[k], method)(request, **self._kw(timeout)))
        except grpc.RpcError as e:
            raise _error(self.targets[k], method, e) from None

    def info(self) -> list[dict]:
        """Each server's IndexInfo, as dicts."""
        from google.protobuf.json_format import MessageToDict

        return [MessageToDict(i, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                for i in self._infos()]

    def _infos(self) -> list[cpb.IndexInfo]:
        return self._call_all("Info", cpb.InfoRequest())

    def layout(self) -> _Layout:
        if self._layout is None:
            self._layout = _Layout(self._infos())
        return self._layout

    def close(self) -> None:
        self._close_sessions()
        for c in self.channels:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _AsyncBase(_Base):
    def __init__(self, targets, **kw):
        super().__init__(targets, aio=True, **kw)

    async def _call(self, k: int, method: str, request, timeout=None):
        t = self.timeout if timeout is None else timeout
        s = self._session_for(k, method, t, _AsyncSession)
        if s is not None and not s.lock.locked():
            async with s.lock:
                try:
                    resp = await s.call(method, request, t)
                except BaseException as e:
                    self._session_failed(k, s, e, method, t)   # raises, unless the call should go unary
                else:
                    return _session_answer(self.targets[k], method, resp, self.response_classes[method])
        try:
            return await getattr(self.stubs[k], method)(request, **self._kw(timeout))
        except grpc.RpcError as e:
            raise _error(self.targets[k], method, e) from None

    async def _call_all(self, method: str, request, timeout=None) -> list:
        if len(self.stubs) == 1:
            return [await self._call(0, method, request, timeout)]
        return list(await asyncio.gather(*(self._call(k, method, request, timeout) for k in range(len(self.stubs)))))

    async def _stream(self, k: int, method: str, request, timeout=None) -> list:
        try:
            return [m async for m in getattr(self.stubs[k], method)(request, **self._kw(timeout))]
        except grpc.RpcError as e:
            raise _error(self.targets[k], method, e) from None

    async def _infos(self) -> list[cpb.IndexInfo]:
        return await self._call_all("Info", cpb.InfoRequest())

    async def info(self) -> list[dict]:
        from google.protobuf.json_format import MessageToDict

        return [MessageToDict(i, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                for i in await self._infos()]

    async def layout(self) -> _Layout:
        if self._layout is None:
            self._layout = _Layout(await self._infos())
        return self._layout

    async def close(self) -> None:
        self._close_sessions()
        for c in self.channels:
            await c.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


# ------------------------------------------------------------------------------------------- n-gram

class _NgramService:
    """What the sync and async n-gram clients share: the service, its stubs, the calls sent over a session."""

    service_name = npb.DESCRIPTOR.services_by_name["NgramService"].full_name
    # the per-token queries a decoder or a scoring loop makes one after another
    session_methods = frozenset({"Count", "Prob", "InfgramProb", "Ntd", "InfgramNtd"})
    response_classes = _response_classes(npb.DESCRIPTOR.services_by_name["NgramService"])

    def __init__(self, targets: str | Sequence[str], **kw):
        super().__init__(targets, **kw)
        self.stubs = [ngrpc.NgramServiceStub(c) for c in self.channels]


class NgramClient(_NgramService, _SyncBase):
    """The n-gram engine over gRPC (one server, or several shard servers whose answers are combined)."""

    def count(self, input_ids, timeout=None) -> dict:
        return _merge_count(self._call_all("Count", npb.CountRequest(query=query_msg(input_ids)), timeout), input_ids)

    def count_many(self, list_of_ids, timeout=None) -> list[int]:
        """Counts of many sequences (token ids; texts allowed too) in one call per server."""
        return _merge_count_many(self._call_all("CountMany", _count_many_req(list_of_ids), timeout))

    def count_cnf(self, cnf, max_clause_freq=None, max_diff_tokens=None, timeout=None) -> dict:
        req = npb.CountCnfRequest(cnf=cnf_msg(cnf), **_opt(max_clause_freq=max_clause_freq, max_diff_tokens=max_diff_tokens))
        return _merge_count(self._call_all("CountCnf", req, timeout))

    def prob(self, prompt_ids, cont_id: int, timeout=None) -> dict:
        req = npb.ProbRequest(prompt=query_msg(prompt_ids), cont_id=int(cont_id))
        return _merge_prob(self._call_all("Prob", req, timeout))

    def ntd(self, prompt_ids, max_support=None, timeout=None) -> dict:
        req = npb.NtdRequest(prompt=query_msg(prompt_ids), **_opt(max_support=max_support))
        return _merge_ntd(self._call_all("Ntd", req, timeout))

    def infgram_prob(self, prompt_ids, cont_id: int, timeout=None) -> dict:
        req = npb.ProbRequest(prompt=query_msg(prompt_ids), cont_id=int(cont_id))
        return _merge_infgram_prob(self._call_all("InfgramProb", req, timeout))

    def infgram_ntd(self, prompt_ids, max_support=None, timeout=None) -> dict:
        req = npb.NtdRequest(prompt=query_msg(prompt_ids), **_opt(max_support=max_support))
        return _merge_infgram_ntd(self._call_all("InfgramNtd", req, timeout))

    def search_docs(self, input_ids, maxnum=None, max_disp_len=None, timeout=None) -> dict:
        req = npb.SearchDocsRequest(query=query_msg(input_ids), **_opt(maxnum=maxnum, max_disp_len=max_disp_len))
        rs = self._call_all("SearchDocs", req, timeout)
        return _merge_search(rs, self.layout() if len(rs) > 1 else None, maxnum)

    def search_docs_cnf(self, cnf, maxnum=None, max_disp_len=None, max_clause_freq=None, max_diff_tokens=None,
                        timeout=None) -> dict:
        req = npb.SearchDocsCnfRequest(cnf=cnf_msg(cnf), **_opt(maxnum=maxnum, max_disp_len=max_disp_len,
                                       max_clause_freq=max_clause_freq, max_diff_tokens=max_diff_tokens))
        rs = self._call_all("SearchDocsCnf", req, timeout)
        return _merge_search(rs, self.layout() if len(rs) > 1 else None, maxnum)

    def get_doc_by_rank(self, s: int, rank: int, max_disp_len=None, timeout=None) -> dict:
        k, local = self.layout().by_shard(s) if len(self.stubs) > 1 else (0, s)
        req = npb.GetDocByRankRequest(s=local, rank=rank, **_opt(max_disp_len=max_disp_len))
        off = self.layout().doc_offsets[k] if len(self.stubs) > 1 else 0
        return doc_dict(self._call(k, "GetDocByRank", req, timeout), off)

    def get_doc_by_ix(self, doc_ix: int, max_disp_len=None, timeout=None) -> dict:
        k, local = self.layout().by_doc(doc_ix) if len(self.stubs) > 1 else (0, doc_ix)
        req = npb.GetDocByIxRequest(doc_ix=local, **_opt(max_disp_len=max_disp_len))
        off = self.layout().doc_offsets[k] if len(self.stubs) > 1 else 0
        return doc_dict(self._call(k, "GetDocByIx", req, timeout), off)

    def score_sequence(self, input_ids, block_size: int = 0, timeout=None) -> dict:
        """∞-gram probability of every token given all before it: {"prob", "suffix_len", "prompt_cnt",
        "cont_cnt", "tokens"}, one entry per position (streamed from the server in blocks)."""
        req = npb.ScoreSequenceRequest(query=query_msg(input_ids), block_size=block_size)
        return _merge_score([self._stream(k, "ScoreSequence", req, timeout) for k in range(len(self.stubs))])

    def tokenize(self, text: str, timeout=None) -> list[int]:
        """The token ids of a text with the index's tokenizer (asked of the first server)."""
        if not isinstance(text, str):
            raise UserError(f"text: expected a string, got {type(text).__name__}")
        r = self._call(0, "Tokenize", npb.TokenizeRequest(texts=[text]), timeout)
        return list(r.ids)

    def decode(self, ids, timeout=None) -> str:
        ids = [int(t) for t in ids]
        r = self._call(0, "Detokenize", cpb.PackedQueries(ids=ids, lengths=[len(ids)]), timeout)
        return r.texts[0]

    def iter_score_sequence(self, input_ids, block_size: int = 0, timeout=None):
        """The blocks of ScoreSequence as they arrive (one server only), each a dict with 'offset'."""
        if len(self.stubs) != 1:
            raise UserError("iter_score_sequence streams from one server; use score_sequence with several")
        req = npb.ScoreSequenceRequest(query=query_msg(input_ids), block_size=block_size)
        try:
            for ch in self.stubs[0].ScoreSequence(req, **self._kw(timeout)):
                yield {"offset": ch.offset, "prob": list(ch.prob), "suffix_len": list(ch.suffix_len),
                       "prompt_cnt": list(ch.prompt_cnt), "cont_cnt": list(ch.cont_cnt), "tokens": list(ch.tokens)}
        except grpc.RpcError as e:
            raise _error(self.targets[0], "ScoreSequence", e) from None


def _count_many_req(list_of_ids) -> npb.CountManyRequest:
    seqs = list_of_ids
    if any(isinstance(q, str) for q in seqs):
        return npb.CountManyRequest(queries=[query_msg(q) for q in seqs])
    return npb.CountManyRequest(packed=packed_msg(seqs))


class AsyncNgramClient(_NgramService, _AsyncBase):
    """NgramClient's methods as coroutines (grpc.aio); same arguments and results."""

    async def count(self, input_ids, timeout=None) -> dict:
        return _merge_count(await self._call_all("Count", npb.CountRequest(query=query_msg(input_ids)), timeout), input_ids)

    async def count_many(self, list_of_ids, timeout=None) -> list[int]:
        return _merge_count_many(await self._call_all("CountMany", _count_many_req(list_of_ids), timeout))

    async def count_cnf(self, cnf, max_clause_freq=None, max_diff_tokens=None, timeout=None) -> dict:
        req = npb.CountCnfRequest(cnf=cnf_msg(cnf), **_opt(max_clause_freq=max_clause_freq, max_diff_tokens=max_diff_tokens))
        return _merge_count(await self._call_all("CountCnf", req, timeout))

    async def prob(self, prompt_ids, cont_id: int, timeout=None) -> dict:
        req = npb.ProbRequest(prompt=query_msg(prompt_ids), cont_id=int(cont_id))
        return _merge_prob(await self._call_all("Prob", req, timeout))

    async def ntd(self, prompt_ids, max_support=None, timeout=None) -> dict:
        req = npb.NtdRequest(prompt=query_msg(prompt_ids), **_opt(max_support=max_support))
        return _merge_ntd(await self._call_all("Ntd", req, timeout))

    async def infgram_prob(self, prompt_ids, cont_id: int, timeout=None) -> dict:
        req = npb.ProbRequest(prompt=query_msg(prompt_ids), cont_id=int(cont_id))
        return _merge_infgram_prob(await self._call_all("InfgramProb", req, timeout))

    async def infgram_ntd(self, prompt_ids, max_support=None, timeout=None) -> dict:
        req = npb.NtdRequest(prompt=query_msg(prompt_ids), **_opt(max_support=max_support))
        return _merge_infgram_ntd(await self._call_all("InfgramNtd", req, timeout))

    async def search_docs(self, input_ids, maxnum=None, max_disp_len=None, timeout=None) -> dict:
        req = npb.SearchDocsRequest(query=query_msg(input_ids), **_opt(maxnum=maxnum, max_disp_len=max_disp_len))
        rs = await self._call_all("SearchDocs", req, timeout)
        return _merge_search(rs, await self.layout() if len(rs) > 1 else None, maxnum)

    async def search_docs_cnf(self, cnf, maxnum=None, max_disp_len=None, max_clause_freq=None, max_diff_tokens=None,
                              timeout=None) -> dict:
        req = npb.SearchDocsCnfRequest(cnf=cnf_msg(cnf), **_opt(maxnum=maxnum, max_disp_len=max_disp_len,
                                       max_clause_freq=max_clause_freq, max_diff_tokens=max_diff_tokens))
        rs = await self._call_all("SearchDocsCnf", req, timeout)
        return _merge_search(rs, await self.layout() if len(rs) > 1 else None, maxnum)

    async def get_doc_by_rank(self, s: int, rank: int, max_disp_len=None, timeout=None) -> dict:
        lay = await self.layout() if len(self.stubs) > 1 else None
        k, local = lay.by_shard(s) if lay else (0, s)
        req = npb.GetDocByRankRequest(s=local, rank=rank, **_opt(max_disp_len=max_disp_len))
        return doc_dict(await self._call(k, "GetDocByRank", req, timeout), lay.doc_offsets[k] if lay else 0)

    async def get_doc_by_ix(self, doc_ix: int, max_disp_len=None, timeout=None) -> dict:
        lay = await self.layout() if len(self.stubs) > 1 else None
        k, local = lay.by_doc(doc_ix) if lay else (0, doc_ix)
        req = npb.GetDocByIxRequest(doc_ix=local, **_opt(max_disp_len=max_disp_len))
        return doc_dict(await self._call(k, "GetDocByIx", req, timeout), lay.doc_offsets[k] if lay else 0)

    async def tokenize(self, text: str, timeout=None) -> list[int]:
        if not isinstance(text, str):
            raise UserError(f"text: expected a string, got {type(text).__name__}")
        return list((await self._call(0, "Tokenize", npb.TokenizeRequest(texts=[text]), timeout)).ids)

    async def decode(self, ids, timeout=None) -> str:
        ids = [int(t) for t in ids]
        return (await self._call(0, "Detokenize", cpb.PackedQueries(ids=ids, lengths=[len(ids)]), timeout)).texts[0]

    async def score_sequence(self, input_ids, block_size: int = 0, timeout=None) -> dict:
        req = npb.ScoreSequenceRequest(query=query_msg(input_ids), block_size=block_size)
        parts = await asyncio.gather(*(self._stream(k, "ScoreSequence", req, timeout) for k in range(len(self.stubs))))
        return _merge_score(list(parts))


# ---------------------------------------------------------------------------------------- retriever

def _is_single(q) -> bool:
    if isinstance(q, (str, rpb.RetrieveQuery)):
        return True
    if isinstance(q, tuple) and len(q) == 2 and q[0] in ("embedding", "ids", "text"):
        return True
    if hasattr(q, "ndim"):
        return q.ndim == 1
    return bool(len(q)) and not isinstance(q[0], (str, tuple, list, rpb.RetrieveQuery)) and not hasattr(q[0], "ndim")


def _retrieve_req(queries, k, exclude_doc, exclude_docs, omit_text) -> tuple[rpb.RetrieveRequest, bool]:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise UserError(f"k {k!r}: expected a positive number of neighbours")
    single = _is_single(queries)
    qs = [queries] if single else list(queries)
    if exclude_doc is None or isinstance(exclude_doc, int):
        per = [exclude_doc] * len(qs)
    else:
        per = list(exclude_doc)
        if len(per) != len(qs):
            raise UserError(f"exclude_doc: {len(per)} entries for {len(qs)} queries (one id or None per query)")
    req = rpb.RetrieveRequest(queries=[retrieve_query_msg(q, e) for q, e in zip(qs, per)], k=k or 0,
                              exclude_docs=[int(d) for d in (exclude_docs or ())], omit_text=omit_text)
    return req, single


class RetrieverClient(_SyncBase):
    """The chunk retriever over gRPC."""

    def __init__(self, targets: str | Sequence[str], **kw):
        super().__init__(targets, **kw)
        if len(self.targets) != 1:
            raise UserError("RetrieverClient takes one server")
        self.stubs = [rgrpc.RetrieverServiceStub(c) for c in self.channels]

    def retrieve(self, queries, k: int | None = None, exclude_doc=None, exclude_docs: Iterable[int] | None = None,
                 omit_text: bool = False, timeout=None):
        """Neighbours of one query (a list of dicts, best first) or of a batch (a list of such lists), as
        `Retriever.search(...)` gives them (Neighbour.to_dict()). A query is a text, token ids, or an
        embedding (a float numpy vector, or ("embedding", values)). exclude_doc: one document id for every
        query, or one id (or None) per query; exclude_docs: ids left out for every query."""
        req, single = _retrieve_req(queries, k, exclude_doc, exclude_docs, omit_text)
        r = self._call(0, "Retrieve", req, timeout)
        out = [[_neighbour(n) for n in ns.neighbours] for ns in r.results]
        return out[0] if single else out

    def search(self, queries, k: int = 2, exclude_doc=None, exclude_docs=None, timeout=None) -> list:
        """`Retriever.search` over gRPC: one list of `retrogram.index.retriever.Neighbour` per query text."""
        from ..index.retriever import Neighbour

        qs = [queries] if isinstance(queries, str) else list(queries)
        if any(not isinstance(q, str) for q in qs):
            raise UserError("queries: expected texts")
        res = self.retrieve([("text", q) for q in qs], k=k, exclude_doc=exclude_doc, exclude_docs=exclude_docs,
                            timeout=timeout)
        return [[Neighbour(**n) for n in ns] for ns in res]


class AsyncRetrieverClient(_AsyncBase):
    def __init__(self, targets: str | Sequence[str], **kw):
        super().__init__(targets, **kw)
        if len(self.targets) != 1:
            raise UserError("AsyncRetrieverClient takes one server")
        self.stubs = [rgrpc.RetrieverServiceStub(c) for c in self.channels]

    async def retrieve(self, queries, k: int | None = None, exclude_doc=None, exclude_docs: Iterable[int] | None = None,
                       omit_text: bool = False, timeout=None):
        req, single = _retrieve_req(queries, k, exclude_doc, exclude_docs, omit_text)
        r = await self._call(0, "Retrieve", req, timeout)
        out = [[_neighbour(n) for n in ns.neighbours] for ns in r.results]
        return out[0] if single else out


# ------------------------------------------------------------------------------------------- CLI hook

def connect(servers: str | Sequence[str], service: str = "ngram", **kw):
    """The client object the CLI uses in place of the engine for `--server`: NgramClient (same methods and
    result dicts as retrogram.ngram.Engine) or RetrieverClient. The API key comes from
    $RETROGRAM_API_KEY when set."""
    import os

    kw.setdefault("api_key", os.environ.get("RETROGRAM_API_KEY", "").split(",")[0].strip() or None)
    if service == "ngram":
        return NgramClient(servers, **kw)
    if service == "retriever":
        if not isinstance(servers, str) and len(servers) != 1:
            raise UserError("--server: the retriever is asked of one server")
        return RetrieverClient(servers if isinstance(servers, str) else servers[0], **kw)
    raise ValueError(f"unknown service {service!r}")
