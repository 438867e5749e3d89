"""The n-gram gRPC service end to end: real indexes built through the pipeline, real servers (child
processes, as `retrogram serve` runs them) on loopback ports, the real clients.

Answers must equal the in-process engine's; errors must carry the right status and say what was wrong;
health, reflection, metrics, API keys, TLS, limits, deadlines, cancellation, shard servers, and the faults
of issue 6 (server killed mid-stream, restart, missing/corrupt index, SIGTERM under load)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import build_ngram_index, free_port as _free_port, write_jsonl
from retrogram.protos import common_pb2 as cpb
from retrogram.protos import ngram_pb2 as npb
from retrogram.protos import ngram_pb2_grpc as ngrpc
from retrogram.services.client import AsyncNgramClient, NgramClient, ServiceError
from retrogram.services.launch import ServerProcess, ThreadServer, retrogram_command

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ngram_index(tmp_path_factory, small_corpus) -> Path:
    return build_ngram_index(tmp_path_factory.mktemp("svc") / "idx", small_corpus)


@pytest.fixture(scope="module")
def engine(ngram_index):
    from retrogram.ngram.engine import Engine

    return Engine(ngram_index)


@pytest.fixture(scope="module")
def server(ngram_index):
    port = _free_port()
    p = ServerProcess("ngram", ngram_index, port=port, extra_args=["--metrics-port", _free_port(), "--access-log"])
    p.metrics_port = int(p.argv[p.argv.index("--metrics-port") + 1])
    p.wait_serving()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def client(server):
    with NgramClient(server.address) as c:
        yield c


def _code(exc_info) -> grpc.StatusCode:
    return exc_info.value.code


@pytest.fixture(scope="module")
def queries(engine):
    texts = ["to be or not", "the king", "What is", "my lord", "O Romeo, Romeo", "zzqxj unlikely"]
    return [engine.tokenize(t) for t in texts]


# ------------------------------------------------------------------------------------------ answers

def test_answers_equal_the_engine(client, engine, queries):
    for q in queries:
        assert client.count(q) == engine.count(q)
        assert client.prob(q[:-1], q[-1]) == engine.prob(q[:-1], q[-1])
        assert client.infgram_prob(q[:-1], q[-1]) == engine.infgram_prob(q[:-1], q[-1])
        assert client.ntd(q[:-1]) == engine.ntd(q[:-1])
        assert client.ntd(q[:1], max_support=3) == engine.ntd(q[:1], max_support=3)
        assert client.infgram_ntd(q) == engine.infgram_ntd(q)
        s, r = client.search_docs(q, maxnum=3, max_disp_len=20), engine.search_docs(q, maxnum=3, max_disp_len=20)
        assert (s["cnt"], s["approx"], len(s["documents"])) == (r["cnt"], r["approx"], len(r["documents"]))
        for d in s["documents"]:   # documents are drawn at random: each must be a real occurrence
            t = d["token_ids"]
            assert t[d["needle_offset"]:d["needle_offset"] + len(q)] == q
    assert client.count_many(queries) == engine.count_many(queries).tolist()
    assert client.count_many([]) == []
    cnf = [[queries[1]], [queries[3], queries[2]]]
    assert client.count_cnf(cnf) == engine.count_cnf(cnf)
    assert client.count_cnf(cnf, max_clause_freq=2, max_diff_tokens=5) == engine.count_cnf(cnf, 2, 5)
    r = client.search_docs_cnf(cnf, maxnum=2)
    assert r["cnt"] == engine.search_docs_cnf(cnf)["cnt"]
    for ix in (0, engine.get_total_doc_cnt() - 1):
        assert client.get_doc_by_ix(ix, max_disp_len=50) == engine.get_doc_by_ix(ix, max_disp_len=50)
    assert client.get_doc_by_rank(0, 123, max_disp_len=9) == engine.get_doc_by_rank(0, 123, max_disp_len=9)
    info = client.info()[0]
    assert int(info["num_documents"]) == engine.get_total_doc_cnt()
    assert int(info["num_tokens"]) == engine.get_total_tok_cnt()
    assert info["vocab_size"] == engine.vocab_size and info["tokenizer"] == "smollm2"


def test_count_many_in_several_steps(client, engine, queries):
    """More queries than the server counts in one step (it checks for cancellation between steps)."""
    from retrogram.services.ngram_service import BATCH_STEP

    many = [queries[i % len(queries)][: 1 + i % 3] for i in range(BATCH_STEP + 1234)]
    assert client.count_many(many) == engine.count_many(many).tolist()


def test_text_queries_are_tokenized_by_the_server(client, engine):
    r = client.count("my lord")
    assert r["tokens"] == engine.tokenize("my lord")
    # the server tokenizes a text as typed (the engine's exact=True; the CLI adds the other forms itself)
    assert r["count"] == engine.count_text("my lord", exact=True)["count"] and r["approx"] is False
    assert client.count_many(["my lord", engine.tokenize("the king")]) == \
        engine.count_many([engine.tokenize("my lord"), engine.tokenize("the king")]).tolist()
    assert client.count_cnf([["my lord"], ["the"]]) == engine.count_cnf_text([["my lord"], ["the"]], exact=True)


def test_score_sequence_streams_every_position(client, engine, ngram_index):
    text = (ngram_index / "tokenizer").exists() and "My lord, the king is dead; long live the king. " * 40
    ids = engine.tokenize(text)
    want = engine.score_sequence(ids)
    got = client.score_sequence(ids, block_size=37)
    assert got["tokens"] == ids
    for key in ("prob", "suffix_len", "prompt_cnt", "cont_cnt"):
        assert got[key] == want[key].tolist(), key
    blocks = list(client.iter_score_sequence(ids, block_size=100))
    assert [b["offset"] for b in blocks] == list(range(0, len(ids), 100))
    assert sum(len(b["prob"]) for b in blocks) == len(ids)


def test_async_client(server, engine, queries):
    import asyncio

    async def main():
        async with AsyncNgramClient(server.address) as c:
            got = await asyncio.gather(*(c.count(q) for q in queries))
            assert got == [engine.count(q) for q in queries]
            assert await c.count_many(queries) == engine.count_many(queries).tolist()
            q = queries[0]
            assert await c.infgram_prob(q[:-1], q[-1]) == engine.infgram_prob(q[:-1], q[-1])
            s = await c.score_sequence(q * 5)
            assert s["suffix_len"] == engine.score_sequence(q * 5)["suffix_len"].tolist()
            blocks = [b async for b in c.iter_score_sequence(q * 5, block_size=3)]   # the async client has it too
            with NgramClient(server.address) as sync:
                assert blocks == list(sync.iter_score_sequence(q * 5, block_size=3))
            assert [b["offset"] for b in blocks] == list(range(0, len(q * 5), 3))
            assert await c.get_doc_by_ix(1, max_disp_len=20) == engine.get_doc_by_ix(1, max_disp_len=20)
            assert await c.tokenize("my lord") == engine.tokenize("my lord")
            with pytest.raises(ServiceError) as e:
                await c.count([])
            assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())


def test_clients_from_one_table_satisfy_the_query_protocol(server, engine):
    """Both n-gram clients have every method of the table, with the same signatures (the async one's
    coroutines, its iter_* async iterators), and satisfy the engine's query Protocol by name, position,
    kind and default of every parameter, as Engine does."""
    import asyncio
    import inspect

    from retrogram.ngram.api import AsyncNgramQueries, NgramQueries, conformance_errors
    from retrogram.services.client import (
        NGRAM_METHODS,
        RETRIEVER_METHODS,
        AsyncRetrieverClient,
        RetrieverClient,
    )

    for sync, aio, table in ((NgramClient, AsyncNgramClient, NGRAM_METHODS),
                             (RetrieverClient, AsyncRetrieverClient, RETRIEVER_METHODS)):
        for name, m in table.items():
            s, a = getattr(sync, name), getattr(aio, name)
            assert inspect.signature(s) == inspect.signature(a), name
            assert list(inspect.signature(s).parameters)[-1] == "timeout", name
            assert not inspect.iscoroutinefunction(s) and inspect.iscoroutinefunction(a) == (m.ask != "iter"), name
        assert sync.session_methods == aio.session_methods == {m.rpc for m in table.values() if m.session}
    assert NgramClient.session_methods == {"Count", "Prob", "InfgramProb", "Ntd", "InfgramNtd"}
    assert conformance_errors(engine, NgramQueries) == []
    with NgramClient(server.address) as c:
        assert conformance_errors(c, NgramQueries) == [] and isinstance(c, NgramQueries)
        assert conformance_errors(c, AsyncNgramQueries)   # not the async protocol
    assert conformance_errors(AsyncNgramClient, NgramQueries)   # nor the reverse

    async def main():
        async with AsyncNgramClient(server.address) as a:
            assert conformance_errors(a, AsyncNgramQueries) == [] and isinstance(a, AsyncNgramQueries)
            q = engine.tokenize(" the king")
            assert await a.ntd(q, 3) == engine.ntd(q, 3)   # positional arguments as the engine takes them

    asyncio.run(main())


# ----------------------------------------------------------------------------------------- sessions

def _session_stream(address: str):
    """A raw Session stream: (send(method, request message, id) , read() -> SessionResponse, call)."""
    ch = grpc.insecure_channel(address)
    requests: "queue.SimpleQueue" = __import__("queue").SimpleQueue()
    call = ch.stream_stream("/retrogram.v1.NgramService/Session")(iter(requests.get, None), timeout=30)

    def send(method: str, msg, call_id: int, raw: bytes | None = None):
        requests.put(cpb.SessionRequest(id=call_id, method=method,
                                        request=msg.SerializeToString() if raw is None else raw).SerializeToString())

    def read() -> cpb.SessionResponse:
        return cpb.SessionResponse.FromString(next(call))

    def close():
        requests.put(None)
        call.cancel()
        ch.close()

    return send, read, close


def test_session_answers_in_order_and_errors_end_only_their_call(server, engine, queries):
    send, read, close = _session_stream(server.address)
    try:
        for i, q in enumerate(queries):   # pipelined: all sent before any answer is read
            send("Count", npb.CountRequest(query=cpb.Query(ids=q)), 100 + i)
        send("Count", npb.CountRequest(query=cpb.Query(ids=[])), 7)
        send("NoSuch", npb.CountRequest(), 8)
        send("Count", None, 9, raw=b"\xff\xff\xff")
        send("Prob", npb.ProbRequest(prompt=cpb.Query(ids=[1]), cont_id=70000), 10)
        send("InfgramProb", npb.ProbRequest(prompt=cpb.Query(ids=queries[0][:-1]), cont_id=queries[0][-1]), 11)
        for i, q in enumerate(queries):
            r = read()
            assert (r.id, r.code) == (100 + i, 0)
            assert npb.CountResponse.FromString(r.response).count == engine.count(q)["count"]
        for call_id, words in [(7, "empty"), (8, "not a unary method"), (9, "malformed"), (10, "cont_id")]:
            r = read()
            assert r.id == call_id and r.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and words in r.message, r
        r = read()   # the stream outlived the errors
        want = engine.infgram_prob(queries[0][:-1], queries[0][-1])
        assert r.code == 0 and npb.InfgramProbResponse.FromString(r.response).suffix_len == want["suffix_len"]
    finally:
        close()


def test_clients_send_small_calls_over_a_session(server, engine, queries):
    import asyncio

    with NgramClient(server.address) as c, NgramClient(server.address, sessions=False) as u:
        for q in queries:
            assert c.count(q) == u.count(q) == engine.count(q)
            assert c.ntd(q[:-1]) == u.ntd(q[:-1]) == engine.ntd(q[:-1])
        session = c._sessions[0]
        assert session is not None and u._sessions[0] is None
        with pytest.raises(ServiceError) as e:
            c.prob([1], 70000)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "cont_id" in str(e.value)
        assert c._sessions[0] is session   # an error answer keeps the session
        # a thread finding the session busy makes a unary call: same answers under concurrency
        results = {}

        def work(k):
            results[k] = [c.count(q)["count"] for q in queries * 20]

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r == [engine.count(q)["count"] for q in queries * 20] for r in results.values())

    async def main():
        async with AsyncNgramClient(server.address) as a:
            for q in queries:
                assert await a.infgram_prob(q[:-1], q[-1]) == engine.infgram_prob(q[:-1], q[-1])
            assert a._sessions[0] is not None
            with pytest.raises(ServiceError) as e:
                await a.count([])
            assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())


def test_session_deadline_on_a_hung_server_then_recovery(ngram_index):
    with ServerProcess("ngram", ngram_index).wait_serving() as p, NgramClient(p.address, timeout=10) as c:
        before = c.count([1, 2])
        os.kill(p.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(ServiceError) as e:
                c.count([1, 2], timeout=1.5)
            waited = time.monotonic() - t0
            assert _code(e) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 1.4 < waited < 5, waited
        finally:
            os.kill(p.proc.pid, signal.SIGCONT)
        assert c.count([1, 2]) == before
        time.sleep(1.1)   # past the pause after a failed session: the next call opens a new one
        assert c.count([1, 2]) == before and c._sessions[0] is not None


def test_session_limit_falls_back_to_unary_calls(ngram_index, engine, queries):
    from retrogram.services.ngram_service import NgramServicer
    from retrogram.services.serving import ServeConfig

    # 2 concurrent calls allowed, so at most 1 session: the second client's session is refused
    with ThreadServer([NgramServicer(ngram_index)], ServeConfig(max_concurrent_rpcs=2)).load() as srv:
        with NgramClient(srv.address) as a, NgramClient(srv.address) as b:
            assert a.count(queries[0]) == engine.count(queries[0])
            for q in queries:
                assert b.count(q) == engine.count(q)
                assert a.count(q) == engine.count(q)
            assert a._sessions[0] is not None and b._sessions[0] is None


def test_sigterm_ends_idle_sessions_at_once(ngram_index):
    p = ServerProcess("ngram", ngram_index, extra_args=["--grace", "30"]).wait_serving()
    c = NgramClient(p.address, retries=False)
    try:
        c.count([1, 2])
        assert c._sessions[0] is not None   # open and idle
        t0 = time.monotonic()
        p.signal(signal.SIGTERM)
        assert p.proc.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 10   # not the 30 s grace
        with pytest.raises(ServiceError) as e:
            c.count([1, 2])
        assert _code(e) == grpc.StatusCode.UNAVAILABLE
    finally:
        c.close()
        p.stop()


# ------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call, code, words", [
    (lambda c: c.count([]), "INVALID_ARGUMENT", "empty"),
    (lambda c: c.count([49152]), "INVALID_ARGUMENT", "vocabulary"),
    (lambda c: c.count([65535]), "INVALID_ARGUMENT", "separator"),
    (lambda c: c.prob([1, 2], 70000), "INVALID_ARGUMENT", "cont_id"),
    (lambda c: c.count_cnf([]), "INVALID_ARGUMENT", "cnf"),
    (lambda c: c.count_cnf([[]]), "INVALID_ARGUMENT", "clause 0"),
    (lambda c: c.ntd([1], max_support=0), "INVALID_ARGUMENT", "max_support"),
    (lambda c: c.search_docs([1], maxnum=0), "INVALID_ARGUMENT", "maxnum"),
    (lambda c: c.search_docs([1], maxnum=10**6), "RESOURCE_EXHAUSTED", "maxnum"),
    (lambda c: c.count(list(range(1, 70000))), "RESOURCE_EXHAUSTED", "tokens"),
    (lambda c: c.get_doc_by_ix(10**9), "NOT_FOUND", "doc_ix"),
    (lambda c: c.get_doc_by_rank(7, 0), "NOT_FOUND", "shard 7"),
    (lambda c: c.get_doc_by_rank(0, 10**12), "NOT_FOUND", "rank"),
])
def test_errors_say_what_was_wrong(client, call, code, words):
    with pytest.raises(ServiceError) as e:
        call(client)
    assert _code(e).name == code, str(e.value)
    assert words in str(e.value)


def _raw(address: str, method: str, payload: bytes, **kw):
    with grpc.insecure_channel(address) as ch:
        return ch.unary_unary(f"/retrogram.v1.NgramService/{method}")(payload, timeout=10, **kw)


def test_malformed_and_unknown_fields_are_invalid_argument(server):
    good = npb.CountRequest(query=cpb.Query(ids=[5, 6])).SerializeToString()
    assert npb.CountResponse.FromString(_raw(server.address, "Count", good)).count >= 0
    for payload, words in [(b"\xff\xff\xff", "malformed"), (good + b"\xa8\x1f\x07", "does not define"),
                           (b"\x0a\x03\x12\x01\xff", "malformed")]:
        with pytest.raises(grpc.RpcError) as e:
            _raw(server.address, "Count", payload)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _raw(server.address, "NoSuchMethod", b"")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_message_size_limit(ngram_index):
    from retrogram.services.ngram_service import NgramServicer
    from retrogram.services.serving import ServeConfig

    with ThreadServer([NgramServicer(ngram_index)], ServeConfig(max_message_bytes=4096)).load() as srv:
        with NgramClient(srv.address) as c:
            assert c.count([1, 2])["count"] >= 0
            with pytest.raises(ServiceError) as e:
                c.count_many([[1, 2, 3]] * 2000)
            assert _code(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in str(e.value)


def test_deadline_and_cancellation(client, server, engine):
    ids = engine.tokenize("the king " * 100000)
    with pytest.raises(ServiceError) as e:
        client.score_sequence(ids, timeout=0.001)
    assert _code(e) == grpc.StatusCode.DEADLINE_EXCEEDED
    # a stream the client abandons after one block is cancelled on the server
    stub = ngrpc.NgramServiceStub(client.channels[0])
    call = stub.ScoreSequence(npb.ScoreSequenceRequest(query=cpb.Query(ids=ids), block_size=2))   # ~100k messages
    next(call)
    call.cancel()
    assert client.count([1])["count"] >= 0
    metrics = _wait_metric(server, 'retrogram_rpc_requests_total{code="CANCELLED",method="ScoreSequence"')
    assert metrics


def _scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def _wait_metric(server, prefix: str, tries: int = 100) -> str | None:
    for _ in range(tries):   # the server records a cancelled call when its handler unwinds
        text = _scrape(server)
        lines = [ln for ln in text.splitlines() if ln.replace('service="ngram",', "").startswith(prefix)]
        if lines:
            return lines[0]
        time.sleep(0.05)
    return None


def test_concurrency_limit(ngram_index, engine):
    from retrogram.services.ngram_service import NgramServicer
    from retrogram.services.serving import ServeConfig

    ids = engine.tokenize("the king " * 100000)
    with ThreadServer([NgramServicer(ngram_index)], ServeConfig(max_concurrent_rpcs=1)).load() as srv:
        ch = grpc.insecure_channel(srv.address)
        stub = ngrpc.NgramServiceStub(ch)
        # a stream the client does not read stays in flight (flow control holds the server's writes)
        held = stub.ScoreSequence(npb.ScoreSequenceRequest(query=cpb.Query(ids=ids), block_size=2))
        next(held)
        with pytest.raises(grpc.RpcError) as e:
            stub.Count(npb.CountRequest(query=cpb.Query(ids=[1])), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        held.cancel()
        ch.close()


# ------------------------------------------------------------------------- health, reflection, metrics

def test_health_reflection_metrics(server, client):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for name in ("", "retrogram.v1.NgramService"):
            assert h.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            h.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = list(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp[0].list_services_response.service}
        assert {"retrogram.v1.NgramService", "grpc.health.v1.Health"} <= names
        resp = list(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="retrogram.v1.NgramService")])))
        assert resp[0].file_descriptor_response.file_descriptor_proto
    # the compose health check command
    out = subprocess.run([*retrogram_command(), "health", server.address,
                          "--service", "retrogram.v1.NgramService"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "SERVING"
    client.count([1, 2])
    text = _scrape(server)
    assert 'retrogram_rpc_requests_total{code="OK",method="Count",service="ngram"}' in text
    assert 'retrogram_rpc_latency_seconds_bucket{' in text
    assert 'retrogram_index_loaded{service="ngram"} 1.0' in text
    # structured logs: JSON lines on stderr
    logs = [json.loads(ln) for ln in server.stderr_text.splitlines() if ln.startswith("{")]
    assert any(ev["event"] == "index_loaded" for ev in logs)
    assert any(ev["event"] == "rpc" and ev.get("method") == "Count" for ev in logs)


def test_health_of_nothing_listening():
    out = subprocess.run([*retrogram_command(), "health", f"127.0.0.1:{_free_port()}",
                          "--timeout", "2"], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout.strip() == "UNREACHABLE"


# --------------------------------------------------------------------------------------- security

def test_api_keys(ngram_index, tmp_path):
    from retrogram.services.ngram_service import NgramServicer
    from retrogram.services.serving import ServeConfig, load_api_keys, validate_config

    keyfile = tmp_path / "keys"
    keyfile.write_text("# keys\nsecret-one\nsecret-two\n")
    keys = load_api_keys(keyfile)
    assert keys == ("secret-one", "secret-two")
    with ThreadServer([NgramServicer(ngram_index)], ServeConfig(api_keys=keys)).load() as srv:
        with NgramClient(srv.address) as c:
            with pytest.raises(ServiceError) as e:
                c.count([1])
            assert _code(e) == grpc.StatusCode.UNAUTHENTICATED and "x-api-key" in str(e.value)
            with pytest.raises(ServiceError) as e:
                c.score_sequence([1, 2, 3])   # streams too
            assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
        with NgramClient(srv.address, api_key="wrong") as c, pytest.raises(ServiceError):
            c.count([1])
        with NgramClient(srv.address, api_key="secret-two") as c:
            assert c.count([1])["count"] >= 0
        from retrogram.services.cli_serve import check_health

        assert check_health(srv.address) == "SERVING"     # health checks need no key
    # beyond loopback, keys are required (checked before anything binds)
    from retrogram.index.errors import UserError

    with pytest.raises(UserError, match="API keys"):
        validate_config(ServeConfig(host="0.0.0.0"))
    validate_config(ServeConfig(host="0.0.0.0", api_keys=("k",)))
    out = subprocess.run([*retrogram_command(), "serve", "ngram", "--index", str(ngram_index),
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                         env={**os.environ, "RETROGRAM_API_KEY": ""})
    assert out.returncode == 2 and "API keys" in out.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test certificate")
def test_tls(ngram_index, tmp_path):
    from retrogram.services.ngram_service import NgramServicer
    from retrogram.services.serving import ServeConfig

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    with ThreadServer([NgramServicer(ngram_index)], ServeConfig(tls_cert=cert, tls_key=key)).load() as srv:
        with NgramClient(srv.address, root_certificates=cert) as c:
            assert c.count([1])["count"] >= 0
        with NgramClient(srv.address, retries=False, timeout=5) as c, pytest.raises(ServiceError) as e:
            c.count([1])   # plaintext to a TLS port
        assert _code(e) == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------------- shard servers

def test_shard_servers_add_up(tmp_path_factory, small_corpus, ngram_index, engine, queries):
    """The corpus split in two indexes, one server each: the client's combined answers equal one
    server's over the whole corpus (counts add; ∞-gram takes the longest suffix found anywhere)."""
    from retrogram.services.ngram_service import NgramServicer

    recs = [json.loads(ln) for ln in small_corpus.read_text().splitlines()]
    root = tmp_path_factory.mktemp("parts")
    parts = [build_ngram_index(root / f"p{i}", write_jsonl(root / f"p{i}.jsonl", recs[i * 2:(i + 1) * 2]))
             for i in range(2)]
    servers = [ThreadServer([NgramServicer(p)]).load() for p in parts]
    try:
        with NgramClient([s.address for s in servers]) as c:
            for q in queries:
                assert c.count(q) == engine.count(q)
                assert c.prob(q[:-1], q[-1]) == engine.prob(q[:-1], q[-1])
                assert c.infgram_prob(q[:-1], q[-1]) == engine.infgram_prob(q[:-1], q[-1])
                want = engine.ntd(q[:-1])
                if not want["approx"]:
                    got = c.ntd(q[:-1])
                    assert got["prompt_cnt"] == want["prompt_cnt"]
                    assert {t: v["cont_cnt"] for t, v in got["result_by_token_id"].items()} == \
                        {t: v["cont_cnt"] for t, v in want["result_by_token_id"].items()}
                s = c.search_docs(q, maxnum=4)
                assert s["cnt"] == engine.search_docs(q)["cnt"]
                for d in s["documents"]:
                    full = engine.get_doc_by_ix(d["doc_ix"], max_disp_len=10**6)["token_ids"]
                    assert q in [full[i:i + len(q)] for i in range(len(full))]
            assert c.count_many(queries) == engine.count_many(queries).tolist()
            ids = engine.tokenize("My lord, the king is dead; long live the king. " * 5)
            got, want = c.score_sequence(ids), engine.score_sequence(ids)
            assert got["suffix_len"] == want["suffix_len"].tolist()
            assert got["prompt_cnt"] == want["prompt_cnt"].tolist() and got["cont_cnt"] == want["cont_cnt"].tolist()
            n = engine.get_total_doc_cnt()
            for ix in range(n):   # documents numbered across the servers in order
                assert c.get_doc_by_ix(ix, max_disp_len=30)["token_ids"] == \
                    engine.get_doc_by_ix(ix, max_disp_len=30)["token_ids"]
            with pytest.raises(ServiceError) as e:
                c.get_doc_by_ix(n + 5)
            assert _code(e) == grpc.StatusCode.NOT_FOUND
    finally:
        for s in servers:
            s.stop(0)


# ------------------------------------------------------------------------------------------ faults

def test_server_killed_mid_stream(ngram_index, engine):
    ids = engine.tokenize("the king " * 200000)
    with ServerProcess("ngram", ngram_index).wait_serving() as p, NgramClient(p.address, retries=False) as c:
        stream = c.iter_score_sequence(ids, block_size=16)   # many small messages: still streaming when killed
        first = next(stream)
        assert first["offset"] == 0
        p.stop(kill=True)
        with pytest.raises(ServiceError) as e:
            for _ in stream:
                pass
        assert _code(e) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        assert "ScoreSequence" in str(e.value) and p.address in str(e.value)


def test_client_recovers_after_restart(ngram_index):
    port = _free_port()
    p = ServerProcess("ngram", ngram_index, port=port).wait_serving()
    c = NgramClient(f"127.0.0.1:{port}", timeout=10)
    try:
        before = c.count([1, 2])
        p.stop()
        with pytest.raises(ServiceError) as e:
            c.count([1, 2])
        assert _code(e) == grpc.StatusCode.UNAVAILABLE
        p = ServerProcess("ngram", ngram_index, port=port).wait_serving()
        after = None
        for _ in range(50):   # the channel reconnects on its own (backoff <= 2 s); no new client
            try:
                after = c.count([1, 2])
                break
            except ServiceError:
                time.sleep(0.2)
        assert after == before
    finally:
        c.close()
        p.stop()


def _serve_fails(index: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*retrogram_command(), "serve", "ngram", "--index", str(index),
                           "--port", "0"], capture_output=True, text=True, timeout=120)


def test_missing_or_corrupt_index_is_refused_with_the_file_named(ngram_index, tmp_path):
    r = _serve_fails(tmp_path / "nope")
    assert r.returncode == 2 and str(tmp_path / "nope") in r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(ngram_index, bad)
    table = bad / "ngram" / "table.0"
    with open(table, "r+b") as f:
        f.truncate(table.stat().st_size - 3)
    r = _serve_fails(bad)
    assert r.returncode == 2 and str(table) in r.stderr and "truncated" in r.stderr
    shutil.rmtree(bad / "ngram")
    r = _serve_fails(bad)
    assert r.returncode == 2 and str(bad / "ngram") in r.stderr
    (bad / "manifest.json").write_text("{not json")
    r = _serve_fails(bad)
    assert r.returncode == 2 and str(bad / "manifest.json") in r.stderr


def test_sigterm_under_load_loses_no_accepted_call(ngram_index, queries):
    p = ServerProcess("ngram", ngram_index, extra_args=["--access-log", "--grace", "30"]).wait_serving()
    outcomes: list[str] = []
    details: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(k):
        with NgramClient(p.address, retries=False, timeout=30) as c:
            i = 0
            while not stop.is_set() and i < 2000:
                i += 1
                try:
                    if i % 5 == 0:
                        c.score_sequence(queries[k % len(queries)] * 200)
                    elif i % 5 == 1:
                        c.count(queries[k % len(queries)])   # over the client's session
                    else:
                        c.count_many(queries * 50)
                    r = "OK"
                except ServiceError as e:
                    r = e.code.name if e.code else "ERROR"
                    details.append(str(e))
                with lock:
                    outcomes.append(r)
                if r != "OK":
                    return

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    while len(outcomes) < 50:
        time.sleep(0.01)
    p.signal(signal.SIGTERM)
    rc = p.proc.wait(timeout=60)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert rc == 0
    logs = [json.loads(ln) for ln in p.stderr_text.splitlines() if ln.startswith("{")]
    served = [ev for ev in logs if ev["event"] == "rpc"]
    # the server finished every call it started; the few that arrived while it was stopping were refused
    assert served and {ev["code"] for ev in served} <= {"OK", "UNAVAILABLE"}, (
        [ev for ev in served if ev["code"] != "OK"], outcomes[-20:], p.stderr_text[-3000:])
    ok = outcomes.count("OK")
    assert ok == sum(ev["code"] == "OK" for ev in served), "every call the server answered reached its client"
    # the others were refused: UNAVAILABLE (shutting down, or nothing listening any more), or CANCELLED by
    # gRPC for a call that arrived as the server closed; the server never started those (checked above)
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, details   # the rest were refused, never started
    assert any(ev["event"] == "stopped" for ev in logs)


# --------------------------------------------------------------------------------------------- CLI

def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([*retrogram_command(), *map(str, argv)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("argv", [
    ["count", "--json", "my lord"], ["infgram-ntd", "--json", "the king"],
    ["count", "--cnf", "king AND lord OR queen", "--json"], ["doc", "2", "--json", "--max-disp-len", "20"],
])
def test_cli_server_flag_answers_like_the_index(server, ngram_index, argv):
    local = _cli("ngram", *argv, "--index", ngram_index)
    remote = _cli("ngram", *argv, "--server", server.address)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)


def test_cli_server_flag_errors(server, ngram_index):
    r = _cli("ngram", "count", "--ids", "49152", "--server", server.address)
    assert r.returncode == 2 and "vocabulary" in r.stderr and "INVALID_ARGUMENT" in r.stderr
    r = _cli("ngram", "count", "x", "--server", f"127.0.0.1:{_free_port()}")
    assert r.returncode == 2 and "no server answering" in r.stderr
    r = _cli("ngram", "count", "x", "--server", server.address, "--index", ngram_index)
    assert r.returncode == 2 and "--index and --server" in r.stderr


@pytest.mark.parametrize("module", ["client", "serving"])
def test_grpc_io_choice_is_made_before_grpc_loads(module):
    """grpc_env (imported first by client.py and serving.py) picks grpc core's iomgr polling before grpc is
    imported, unless told not to, and leaves a GRPC_EXPERIMENTS given by the user alone."""
    code = (f"import os, sys; from retrogram.services import {module}; from retrogram.services import grpc_env; "
            "print(grpc_env.LOW_LATENCY_IO, os.environ.get('GRPC_EXPERIMENTS', ''))")
    base = {k: v for k, v in os.environ.items() if k not in ("GRPC_EXPERIMENTS", "RETROGRAM_GRPC_EVENT_ENGINE")}

    def run(**env):
        return subprocess.run([sys.executable, "-P", "-c", code], env={**base, **env}, capture_output=True, text=True,
                              check=True).stdout.split()

    assert run() == ["True", "-event_engine_client,-event_engine_listener"]
    assert run(RETROGRAM_GRPC_EVENT_ENGINE="1") == ["False"]
    assert run(GRPC_EXPERIMENTS="-foo") == ["False", "-foo"]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
def test_io_cpu_pins_the_loop_not_the_engine_threads(ngram_index, engine, queries):
    from retrogram.index.errors import UserError
    from retrogram.services.serving import ServeConfig, validate_config

    cpus = sorted(os.sched_getaffinity(0))
    with pytest.raises(UserError, match="--io-cpu"):
        validate_config(ServeConfig(io_cpu=max(cpus) + 1000))
    cpu = cpus[-1]
    with ServerProcess("ngram", ngram_index, extra_args=["--io-cpu", str(cpu), "--no-inline"]).wait_serving() as srv:
        with NgramClient(srv.address) as c:
            for q in queries[:20]:
                assert c.count(q)["count"] == engine.count(q)["count"]
        allowed = {}
        for task in Path(f"/proc/{srv.proc.pid}/task").iterdir():
            line = next(ln for ln in (task / "status").read_text().splitlines() if ln.startswith("Cpus_allowed_list"))
            allowed[int(task.name)] = line.split(":", 1)[1].strip()
        assert allowed[srv.proc.pid] == str(cpu)                   # the event loop (main thread)
        if len(cpus) > 1:                                            # the engine threads are not pinned
            assert any(v != str(cpu) for v in allowed.values())
