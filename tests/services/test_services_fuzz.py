"""Malformed requests (hypothesis) against a real n-gram server and a real retriever server (in this
process, on a loopback port): empty, huge, wrong wire types, invalid ids, out-of-range numbers, unknown
fields, random bytes. Every one is answered with an error status that is not INTERNAL/UNKNOWN, and the
servers stay healthy."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrogram.protos import common_pb2 as cpb
from retrogram.protos import ngram_pb2 as npb
from retrogram.protos import retriever_pb2 as rpb
from retrogram.services.cli_serve import check_health
from retrogram.services.launch import ThreadServer
from retrogram.services.serving import ServeConfig

pytestmark = pytest.mark.timeout(300)

EXAMPLES = 1000          # per n-gram test (several thousand requests); the retriever's below
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE}
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int, payload: bytes | int) -> bytes:
    key = _varint((num << 3) | wire)
    if wire == 0:
        return key + _varint(int(payload))
    if wire == 2:
        return key + _varint(len(payload)) + payload
    if wire == 5:
        return key + bytes(payload)[:4].ljust(4, b"\0")
    return key + bytes(payload)[:8].ljust(8, b"\0")


@pytest.fixture(scope="module")
def ngram_server(tmp_path_factory, small_corpus):
    from conftest import build_ngram_index

    from retrogram.services.ngram_service import NgramServicer

    idx = build_ngram_index(tmp_path_factory.mktemp("fuzz") / "idx", small_corpus)
    srv = ThreadServer([NgramServicer(idx)], ServeConfig(max_message_bytes=1 << 20)).load()
    ch = grpc.insecure_channel(srv.address)
    yield srv, ch
    ch.close()
    srv.stop(5)


def _call(ch, service: str, method: str, payload: bytes, stream: bool = False):
    path = f"/retrogram.v1.{service}/{method}"
    try:
        if stream:
            list(ch.unary_stream(path)(payload, timeout=30))
        else:
            ch.unary_unary(path)(payload, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


NGRAM_METHODS = [m.name for m in npb.DESCRIPTOR.services_by_name["NgramService"].methods
                 if m.name not in ("Info", "Session")]

# structurally invalid: bad ids, empty, both text and ids, huge limits, out of range numbers
short_bad_ids = st.one_of(st.just([]), st.lists(st.integers(49152, 2**32 - 1), min_size=1, max_size=5).map(
    lambda xs: xs + [1]))
bad_ids = st.one_of(short_bad_ids, st.integers(1, 100).map(lambda t: [t] * 70000))   # > 65,536 tokens
both = st.just(cpb.Query(ids=[1], text="x"))
bad_query = st.one_of(bad_ids.map(lambda ids: cpb.Query(ids=ids)), both)
bad_score_query = st.one_of(short_bad_ids.map(lambda ids: cpb.Query(ids=ids)), both)


def _bad_ngram_requests():
    zero_or_huge = st.one_of(st.just(0), st.integers(10**7, 2**32 - 1))
    return st.one_of(
        bad_query.map(lambda q: ("Count", npb.CountRequest(query=q))),
        bad_query.map(lambda q: ("Prob", npb.ProbRequest(prompt=cpb.Query(ids=[1]), cont_id=70000) if q.ids == []
                                 else npb.ProbRequest(prompt=q, cont_id=5))),
        bad_query.map(lambda q: ("Ntd", npb.NtdRequest(prompt=q) if q.ids != [] else npb.NtdRequest(max_support=0))),
        bad_query.map(lambda q: ("InfgramNtd", npb.InfgramNtdResponse() and npb.NtdRequest(prompt=q, max_support=0))),
        bad_query.map(lambda q: ("SearchDocs", npb.SearchDocsRequest(query=q))),
        zero_or_huge.map(lambda n: ("SearchDocs", npb.SearchDocsRequest(query=cpb.Query(ids=[1]), maxnum=n))),
        zero_or_huge.map(lambda n: ("SearchDocs", npb.SearchDocsRequest(query=cpb.Query(ids=[1]), max_disp_len=n))),
        st.integers(5, 2**64 - 1).map(lambda n: ("GetDocByIx", npb.GetDocByIxRequest(doc_ix=n))),
        st.integers(1, 2**32 - 1).map(lambda s: ("GetDocByRank", npb.GetDocByRankRequest(s=s, rank=0))),
        st.integers(10**6, 2**64 - 1).map(lambda r: ("GetDocByRank", npb.GetDocByRankRequest(s=0, rank=r))),
        st.just(("CountCnf", npb.CountCnfRequest())),
        bad_query.map(lambda q: ("CountCnf", npb.CountCnfRequest(cnf=npb.Cnf(clauses=[npb.Disjunction(terms=[q])])))),
        st.just(("CountCnf", npb.CountCnfRequest(cnf=npb.Cnf(clauses=[npb.Disjunction()])))),
        st.just(("SearchDocsCnf", npb.SearchDocsCnfRequest(cnf=npb.Cnf(clauses=[npb.Disjunction(
            terms=[cpb.Query(ids=[1])])]), max_clause_freq=0))),
        bad_query.map(lambda q: ("CountMany", npb.CountManyRequest(queries=[cpb.Query(ids=[1]), q]))),
        st.lists(st.integers(0, 9), min_size=1, max_size=5).map(lambda ls: ("CountMany", npb.CountManyRequest(
            packed=cpb.PackedQueries(ids=[1] * (sum(ls) + 1), lengths=ls)))),
        bad_score_query.map(lambda q: ("ScoreSequence", npb.ScoreSequenceRequest(query=q))),
        st.integers(1 << 17, 2**32 - 1).map(lambda b: ("ScoreSequence", npb.ScoreSequenceRequest(
            query=cpb.Query(ids=[1, 2]), block_size=b))),
    )


@SETTINGS
@given(req=_bad_ngram_requests(), unknown=st.one_of(st.none(), st.tuples(st.integers(16, 500), st.sampled_from([0, 2]))))
def test_ngram_malformed_messages(ngram_server, req, unknown):
    _, ch = ngram_server
    method, msg = req
    payload = msg.SerializeToString()
    if unknown is not None:   # an unknown field on top: still refused
        payload += _field(unknown[0], unknown[1], 7 if unknown[1] == 0 else b"zz")
    code = _call(ch, "NgramService", method, payload, stream=method == "ScoreSequence")
    assert code != grpc.StatusCode.OK and code not in BAD, (method, msg, code)


@SETTINGS
@given(method=st.sampled_from(NGRAM_METHODS), fields=st.lists(st.tuples(
    st.integers(1, 8), st.sampled_from([0, 1, 2, 5]), st.one_of(st.integers(-2**63, 2**64 - 1), st.binary(max_size=40))),
    max_size=6), raw=st.binary(max_size=64))
def test_ngram_wrong_wire_types_and_garbage(ngram_server, method, fields, raw):
    """Arbitrary fields with arbitrary wire types, negative varints, random bytes: never an internal error
    (some of these happen to be valid requests: those may be answered)."""
    _, ch = ngram_server
    def value(w, v):
        if w == 0:
            return v if isinstance(v, int) else len(v)
        return v if isinstance(v, bytes) else v.to_bytes(8, "little", signed=True) if -2**63 <= v < 2**63 else b"\xff" * 8

    payload = b"".join(_field(n, w, value(w, v)) for n, w, v in fields)
    for p in (payload, raw, payload + raw):
        code = _call(ch, "NgramService", method, p, stream=method == "ScoreSequence")
        assert code not in BAD, (method, p, code)


@pytest.fixture(scope="module")
def session(ngram_server):
    """One Session stream kept open for the whole fuzz run: malformed calls must not end it."""
    import queue

    _, ch = ngram_server
    requests: queue.SimpleQueue = queue.SimpleQueue()
    call = ch.stream_stream("/retrogram.v1.NgramService/Session")(iter(requests.get, None), timeout=600)
    yield requests, call
    requests.put(None)
    call.cancel()


BAD_SESSION_CODES = {c.value[0] for c in BAD}


@SETTINGS
@given(req=_bad_ngram_requests(), garbage=st.binary(max_size=64), call_id=st.integers(0, 2**64 - 1),
       method=st.one_of(st.sampled_from(NGRAM_METHODS + ["Info"]), st.text(max_size=12)))
def test_ngram_session_malformed_calls(session, req, garbage, call_id, method):
    """Malformed calls on one Session stream, and garbage in place of a SessionRequest: each answered in
    order with an error that is not an internal one (Info and garbage that happens to parse may answer OK);
    the stream stays open."""
    requests, call = session
    name, msg = req
    sends = [(call_id, cpb.SessionRequest(id=call_id, method=name, request=msg.SerializeToString()).SerializeToString()),
             (call_id, cpb.SessionRequest(id=call_id, method=method, request=garbage).SerializeToString()),
             (None, garbage)]
    for _, raw in sends:
        requests.put(raw)
    for k, (want_id, _) in enumerate(sends):
        r = cpb.SessionResponse.FromString(next(call))
        if want_id is not None:
            assert r.id == want_id
        if k == 0:   # (ScoreSequence is not a unary method: refused by name)
            assert r.code != 0 and r.message, (name, msg, r)
        assert r.code not in BAD_SESSION_CODES, (name, method, garbage, r)


def test_ngram_huge_message_and_still_healthy(ngram_server):
    p, ch = ngram_server
    big = npb.CountManyRequest(packed=cpb.PackedQueries(ids=[1] * 700000, lengths=[1] * 700000)).SerializeToString()
    assert _call(ch, "NgramService", "CountMany", big) == grpc.StatusCode.RESOURCE_EXHAUSTED   # > 1 MiB
    assert check_health(p.address, "retrogram.v1.NgramService") == "SERVING"
    # the server answers real queries after all that
    r = npb.CountResponse.FromString(ch.unary_unary("/retrogram.v1.NgramService/Count")(
        npb.CountRequest(query=cpb.Query(text=" the")).SerializeToString(), timeout=10))
    assert r.count > 0


# ----------------------------------------------------------------------------------------- retriever

@pytest.fixture(scope="module")
def retriever_server(tmp_path_factory, small_corpus):
    from conftest import build_full_index

    from retrogram.services.retriever_service import RetrieverServicer

    idx = build_full_index(tmp_path_factory, small_corpus)
    srv = ThreadServer([RetrieverServicer(idx)], ServeConfig(max_message_bytes=1 << 20)).load()
    ch = grpc.insecure_channel(srv.address)
    yield srv, ch
    ch.close()
    srv.stop(5)


def _bad_retrieve_requests():
    good = rpb.RetrieveQuery(embedding=rpb.Embedding(values=[0.05] * 384))
    bad_q = st.one_of(
        st.just(rpb.RetrieveQuery()),
        st.just(rpb.RetrieveQuery(text="")),
        st.just(rpb.RetrieveQuery(text="   ")),
        st.just(rpb.RetrieveQuery(ids=rpb.TokenIds())),
        st.lists(st.integers(49152, 2**32 - 1), min_size=1, max_size=4).map(
            lambda ids: rpb.RetrieveQuery(ids=rpb.TokenIds(ids=ids))),
        st.lists(st.floats(-1, 1, width=32), max_size=400).filter(lambda v: len(v) != 384).map(
            lambda v: rpb.RetrieveQuery(embedding=rpb.Embedding(values=v))),
        st.sampled_from([float("nan"), float("inf"), -float("inf")]).map(
            lambda x: rpb.RetrieveQuery(embedding=rpb.Embedding(values=[x] * 384))),
        st.integers(4, 2**64 - 1).map(lambda d: rpb.RetrieveQuery(embedding=good.embedding, exclude_doc=d)),
    )
    return st.one_of(
        st.just(rpb.RetrieveRequest()),
        st.lists(bad_q, min_size=1, max_size=3).map(lambda qs: rpb.RetrieveRequest(queries=[good] + qs, k=1)),
        st.integers(1001, 2**32 - 1).map(lambda k: rpb.RetrieveRequest(queries=[good], k=k)),
        st.integers(389, 1000).map(lambda k: rpb.RetrieveRequest(queries=[good], k=k)),
        st.lists(st.integers(4, 2**64 - 1), min_size=1, max_size=3).map(
            lambda ds: rpb.RetrieveRequest(queries=[good], k=1, exclude_docs=ds)),
        st.just(rpb.RetrieveRequest(queries=[good] * 5000, k=1)),
    )


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=_bad_retrieve_requests(), unknown=st.booleans(), raw=st.binary(max_size=48))
def test_retriever_malformed(retriever_server, req, unknown, raw):
    _, ch = retriever_server
    payload = req.SerializeToString()
    if unknown:
        payload += _field(99, 0, 1)
    code = _call(ch, "RetrieverService", "Retrieve", payload)
    assert code != grpc.StatusCode.OK and code not in BAD, (req, code)
    assert _call(ch, "RetrieverService", "Retrieve", raw) not in BAD


def test_retriever_still_healthy(retriever_server):
    p, ch = retriever_server
    assert check_health(p.address, "retrogram.v1.RetrieverService") == "SERVING"
    r = rpb.RetrieveResponse.FromString(ch.unary_unary("/retrogram.v1.RetrieverService/Retrieve")(
        rpb.RetrieveRequest(queries=[rpb.RetrieveQuery(text="the king")], k=2).SerializeToString(), timeout=60))
    assert len(r.results[0].neighbours) == 2
