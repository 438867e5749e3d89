"""serving.Service as a host for any resource: a real test service (tests/services/ticker_service.py) over a test-only
proto compiled here with grpcio-tools, served on loopback by the real server, asked by real grpc clients.

Every kind of method (sync on threads, async on the loop, async-generator and generator streams, each also
inside a Session where unary), cancellation and deadlines reaching the handler (a stream that yields
forever stops when its client cancels; the server's in-flight count returns to zero), health NOT_SERVING
until an async load() finishes, and `retrogram serve NAME` reading the registry."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from retrogram.protos import common_pb2 as cpb
from retrogram.services.launch import ThreadServer, retrogram_command

pytestmark = pytest.mark.timeout(300)

TESTS = Path(__file__).resolve().parent

TICKER_PROTO = """\
syntax = "proto3";
package retrogram_test.v1;
import "retrogram/protos/common.proto";

message Tick { int64 n = 1; string text = 2; }
message TickRequest {
  int64 start = 1;
  int64 count = 2;      // how many ticks; 0: forever
  bool hang = 3;        // after the first tick, await something that never comes
}

service Ticker {
  rpc Add(Tick) returns (Tick);                      // sync, on a worker thread: n + 1
  rpc CountVia(Tick) returns (Tick);                 // async: the count of `text` asked of an n-gram server
  rpc Hang(Tick) returns (Tick);                     // async: awaits until cancelled
  rpc Ticks(TickRequest) returns (stream Tick);      // async generator
  rpc SyncTicks(TickRequest) returns (stream Tick);  // sync generator, on worker threads
  rpc Session(stream retrogram.v1.SessionRequest) returns (stream retrogram.v1.SessionResponse);
}
"""


@pytest.fixture(scope="module")
def proto_dir(tmp_path_factory) -> Path:
    """ticker_pb2.py compiled from TICKER_PROTO, its directory on sys.path."""
    import shutil

    import retrogram.protos
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("ticker_proto")
    src = out / "src"
    (src / "retrogram" / "protos").mkdir(parents=True)
    shutil.copy(Path(retrogram.protos.__file__).parent / "common.proto", src / "retrogram" / "protos")
    (src / "ticker.proto").write_text(TICKER_PROTO)
    include = Path(protoc.__file__).parent / "_proto"
    assert protoc.main(["protoc", f"-I{src}", f"-I{include}", f"--python_out={out}", str(src / "ticker.proto")]) == 0
    sys.path.insert(0, str(out))
    yield out
    sys.path.remove(str(out))


@pytest.fixture(scope="module")
def tk(proto_dir):
    """(ticker_service module, ticker_pb2)."""
    import ticker_pb2
    import ticker_service

    return ticker_service, ticker_pb2


@pytest.fixture(scope="module")
def ngram_server(tmp_path_factory, small_corpus):
    from retrogram.services.ngram_service import NgramServicer
    from conftest import build_ngram_index

    idx = build_ngram_index(tmp_path_factory.mktemp("host") / "idx", small_corpus)
    with ThreadServer([NgramServicer(idx)]).load() as srv:
        srv.index = idx
        yield srv


@pytest.fixture
def ticker(tk, ngram_server):
    """A Ticker (gateway to the n-gram server) served on its own loopback port; (service, server, channel)."""
    mod, _ = tk
    svc = mod.Ticker(ngram_server.address)
    with ThreadServer([svc]).load() as srv, grpc.insecure_channel(srv.address) as ch:
        yield svc, srv, ch


def _unary(ch, method: str, req, resp_cls, **kw):
    return resp_cls.FromString(ch.unary_unary(f"/retrogram_test.v1.Ticker/{method}")(req.SerializeToString(), **kw))


def _stream(ch, method: str, req, **kw):
    """The Ticks of a streaming method (every stream of the Ticker answers Tick messages)."""
    import ticker_pb2

    return ch.unary_stream(f"/retrogram_test.v1.Ticker/{method}", response_deserializer=ticker_pb2.Tick.FromString)(
        req.SerializeToString(), **kw)


def _wait(predicate, what: str, limit_s: float = 10.0) -> None:
    """Poll until predicate() holds; fail naming `what` if it never does within limit_s."""
    end = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {limit_s} s")
        time.sleep(0.01)


# ----------------------------------------------------------------------------------- every kind answers

def test_every_kind_of_method_answers(ticker, tk, ngram_server):
    from retrogram.ngram import Engine

    svc, srv, ch = ticker
    _, pb = tk
    r = _unary(ch, "Add", pb.Tick(n=41), pb.Tick)
    assert r.n == 42 and r.text.startswith("retrogram-rpc")   # sync: on a worker thread
    engine = Engine(ngram_server.index)
    for text in (" the", "my lord", "zzqxj"):                   # async: awaits the n-gram server
        want = engine.count(engine.tokenize(text))["count"]
        assert _unary(ch, "CountVia", pb.Tick(text=text), pb.Tick).n == want
    assert [t.n for t in _stream(ch, "Ticks", pb.TickRequest(start=5, count=40))] == list(range(5, 45))
    assert [t.n for t in _stream(ch, "SyncTicks", pb.TickRequest(start=7, count=40))] == list(range(7, 47))
    assert list(_stream(ch, "Ticks", pb.TickRequest(start=1, count=1))) == [pb.Tick(n=1)]
    assert svc.ended == ["done", "done"]
    # errors of an async method are statuses like a sync one's
    with pytest.raises(grpc.RpcError) as e:
        _unary(ch, "CountVia", pb.Tick(), pb.Tick)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:   # the n-gram server's refusal passes through with its code
        _unary(ch, "CountVia", pb.Tick(text="x" * (1 << 21)), pb.Tick)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _wait(lambda: srv.in_flight == 0, "in-flight back to zero")   # (a status reaches the client first)


def test_session_carries_sync_and_async_methods(ticker, tk, ngram_server):
    svc, srv, ch = ticker
    _, pb = tk
    requests: queue.SimpleQueue = queue.SimpleQueue()
    call = ch.stream_stream("/retrogram_test.v1.Ticker/Session")(iter(requests.get, None), timeout=60)
    try:
        def send(call_id, method, msg, timeout_s=None):
            m = cpb.SessionRequest(id=call_id, method=method, request=msg.SerializeToString())
            if timeout_s is not None:
                m.timeout_s = timeout_s
            requests.put(m.SerializeToString())

        send(1, "Add", pb.Tick(n=1))
        send(2, "CountVia", pb.Tick(text=" the"))
        send(3, "Hang", pb.Tick(), timeout_s=0.3)      # its own deadline: answered, the session goes on
        send(4, "Ticks", pb.TickRequest(count=1))      # streams are not session calls
        send(5, "Add", pb.Tick(n=9))
        got = [cpb.SessionResponse.FromString(next(call)) for _ in range(5)]
        assert [g.id for g in got] == [1, 2, 3, 4, 5]
        assert pb.Tick.FromString(got[0].response).n == 2
        assert got[1].code == 0 and pb.Tick.FromString(got[1].response).n > 0
        assert got[2].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert got[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not a unary method" in got[3].message
        assert got[4].code == 0 and pb.Tick.FromString(got[4].response).n == 10
        assert "cancelled" in svc.ended   # the deadline reached Hang where it awaited
    finally:
        requests.put(None)
        call.cancel()
    _wait(lambda: srv.in_flight == 0, "in-flight back to zero")


# ------------------------------------------------------------------------------ cancellation, deadlines

@pytest.mark.parametrize("hang", [False, True], ids=["yielding-forever", "awaiting-forever"])
def test_client_cancel_stops_a_stream_that_never_ends(ticker, tk, hang):
    """A stream that would yield forever (or awaits forever after its first tick) stops when its client
    cancels: the async generator is closed (GeneratorExit at its yield, or CancelledError where it awaits),
    and the server's in-flight count returns to zero."""
    svc, srv, ch = ticker
    _, pb = tk
    call = _stream(ch, "Ticks", pb.TickRequest(start=0, count=0, hang=hang))
    first = [next(call).n for _ in range(1 if hang else 50)]
    assert first == list(range(len(first)))
    assert srv.in_flight == 1 and svc.ended == []
    call.cancel()
    _wait(svc.ended_event.is_set, "the stream's generator closed after the client cancelled")
    assert len(svc.ended) == 1 and svc.ended[0] in (("cancelled",) if hang else ("cancelled", "closed"))
    _wait(lambda: srv.in_flight == 0, "in-flight back to zero after the cancel")
    assert _unary(ch, "Add", pb.Tick(n=1), pb.Tick).n == 2   # the server goes on


def test_deadline_reaches_async_handlers(ticker, tk):
    svc, srv, ch = ticker
    _, pb = tk
    with pytest.raises(grpc.RpcError) as e:
        _unary(ch, "Hang", pb.Tick(), pb.Tick, timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait(lambda: svc.ended == ["cancelled"], "Hang cancelled at its deadline")
    call = _stream(ch, "Ticks", pb.TickRequest(start=3, hang=True), timeout=0.5)
    assert next(call).n == 3
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait(lambda: svc.ended == ["cancelled", "cancelled"], "the stream cancelled at its deadline")
    _wait(lambda: srv.in_flight == 0, "in-flight back to zero")


def test_client_cancel_reaches_an_async_unary_handler(ticker, tk):
    svc, srv, ch = ticker
    _, pb = tk
    fut = ch.unary_unary("/retrogram_test.v1.Ticker/Hang").future(pb.Tick().SerializeToString())
    _wait(lambda: srv.in_flight == 1, "Hang in flight")
    fut.cancel()
    _wait(lambda: svc.ended == ["cancelled"], "Hang cancelled when its client cancelled")
    _wait(lambda: srv.in_flight == 0, "in-flight back to zero")


# ----------------------------------------------------------------------------------------- loading

def test_not_serving_until_an_async_load_is_done(tk, ngram_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    mod, pb = tk
    svc = mod.Ticker(ngram_server.address, gate=True)
    with ThreadServer([svc]).load(wait=False) as srv, grpc.insecure_channel(srv.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        def status(name=""):
            return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status

        assert status() == status("retrogram_test.v1.Ticker") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            _unary(ch, "Add", pb.Tick(n=1), pb.Tick, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "ticker server is still loading its model ticker" in e.value.details()
        svc.gate.set()
        srv.loading.result(timeout=60)
        assert status() == status("retrogram_test.v1.Ticker") == health_pb2.HealthCheckResponse.SERVING
        assert _unary(ch, "CountVia", pb.Tick(text=" the"), pb.Tick).n > 0   # its client made on the loop


def test_a_method_of_the_wrong_kind_is_refused_when_the_server_starts(tk):
    mod, pb = tk

    class AsyncStream(mod.Ticker):
        async def Ticks(self, request, ctx):   # a coroutine cannot stream
            return pb.Tick()

    class YieldingUnary(mod.Ticker):
        def Add(self, request, ctx):
            yield pb.Tick()

    with pytest.raises(TypeError, match="Ticks streams"):
        ThreadServer([AsyncStream()])
    with pytest.raises(TypeError, match="Add is unary"):
        ThreadServer([YieldingUnary()])


# -------------------------------------------------------------------------------------------- registry

def test_registry_lists_the_services_serve_reads():
    from retrogram.services import registry
    from retrogram.services.serving import Service

    assert [s.name for s in registry.stack()][:2] == ["ngram", "retriever"]
    assert {s.name: s.default_port for s in registry.services()}.items() >= {"ngram": 50051, "retriever": 50052}.items()
    for spec in registry.services():
        cls = spec.load_class()
        assert issubclass(cls, Service) and cls.name == spec.name and spec.description
    with pytest.raises(ValueError, match="already the ngram"):
        registry.register("other", "x:Y", 50051, "clashes")
    from retrogram.index.errors import UserError

    with pytest.raises(UserError, match="unknown service 'nope'"):
        registry.get("nope")
    out = subprocess.run([*retrogram_command(), "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for spec in registry.services():
        assert spec.name in out.stdout and spec.description[:40] in " ".join(out.stdout.split())


def test_retrogram_serve_hosts_a_registered_service(proto_dir, tk):
    """A service registered by name and class path is served by `retrogram serve NAME` (no --index: not an
    index service), answers, and stops on SIGTERM."""
    _, pb = tk
    code = ("import sys; from retrogram.services import registry; "
            "registry.register('ticker', 'ticker_service:Ticker', 50999, 'ticks for the tests'); "
            "from retrogram.services.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(proto_dir), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-P", "-c", code, "serve", "ticker", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        events = []
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] in ("serving", "failed"):
                break
        assert events[-1]["event"] == "serving", (events, proc.stderr.read() if proc.poll() is not None else "")
        with grpc.insecure_channel(events[-1]["address"]) as ch:
            assert _unary(ch, "Add", pb.Tick(n=1), pb.Tick, timeout=30).n == 2
            assert [t.n for t in _stream(ch, "Ticks", pb.TickRequest(start=2, count=3), timeout=30)] == [2, 3, 4]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        logs = [json.loads(ln) for ln in proc.stderr.read().splitlines() if ln.startswith("{")]
        assert any(ev["event"] == "model_loaded" and ev.get("model") == "ticker" for ev in logs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
