"""Python clients for the retrogram gRPC services, sync and async.

    from retrogram.services.client import NgramClient, RetrieverClient
    ng = NgramClient("127.0.0.1:50051")                 # or several shard servers: ["h1:50051", "h2:50051"]
    ng.count([464, 3290])   -> {"count": 12, "approx": False}
    ng.count("to be or")    -> {"count": 3, "approx": False, "tokens": [...]}   (text: tokenized by the server)
    rt = RetrieverClient("127.0.0.1:50052")
    rt.retrieve("what is a list comprehension?", k=2)  -> [[{"score": ..., "chunk_id": ..., ...}, ...]]
    dc = DecoderClient("127.0.0.1:50053")
    for ev in dc.generate("Who was Hamlet?", {"max_tokens": 32}, chat=True): print(ev["text"], end="")

The n-gram client's methods and result dicts are those of `retrogram.ngram.Engine` (infini-gram 2.6.0's
names and fields; `retrogram.ngram.api.NgramQueries`), so code written against the engine runs against a
server: `connect(server)` gives the object the CLI's `--server HOST:PORT` uses. Given several n-gram servers,
each holding some shards of one index, the client asks them all concurrently and combines the answers by
`retrogram.ngram.merge`'s rules (counts add; ∞-gram queries take the longest suffix found on any server;
documents are sampled across servers in proportion to their counts; document indexes and shard numbers run
across the servers in the order given).

Every client method is one row of a table (NGRAM_METHODS, RETRIEVER_METHODS, DECODER_METHODS): the RPC, how the Python
arguments become its request, how one server's answer becomes the engine's result, how several servers'
results combine, and whether the call may go over a session. The sync and the async client are both built
from the table, so each has every method (the async one as coroutines; `iter_*` as async generators).

Small n-gram calls (count, prob, ntd, infgram_prob, infgram_ntd) to one server go over a long-lived Session
stream instead of one gRPC call each (see "sessions" below); `sessions=False` turns that off. Every method
takes a keyword-only `timeout` (seconds; default the client's).

Failures raise `ServiceError` (a UserError: the CLI prints its message) with the gRPC status code.
Calls that find a server unavailable (restarting, still loading its index or model) are retried with
backoff (UNAVAILABLE means nothing was answered, so sending again is safe), and channels reconnect on their
own after a restart. A decoder's generate has no deadline unless given one; closing its iterator cancels it.
"""

from __future__ import annotations

from .grpc_env import (  # noqa: I001 - first: chooses grpc's socket I/O before grpc is imported
    API_KEY_HEADER,
    CODE_BY_VALUE,
    DEFAULT_MAX_MESSAGE_BYTES,
    LOW_LATENCY_IO,  # noqa: F401 - re-exported: the bench reports it
    SESSION_METHOD,
    SESSION_MIN_TIMEOUT_S,
    env_api_key,
)

import asyncio
import inspect
import json
import queue
import threading
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import grpc

from ..index.errors import UserError
from ..ngram import merge
from ..ngram.merge import ShardLayout
from ..protos import common_pb2 as cpb
from ..protos import decoder_pb2 as dpb
from ..protos import decoder_pb2_grpc as dgrpc
from ..protos import ngram_pb2 as npb
from ..protos import ngram_pb2_grpc as ngrpc
from ..protos import retriever_pb2 as rpb
from ..protos import retriever_pb2_grpc as rgrpc

DEFAULT_TIMEOUT_S = 60.0

_RETRY_CONFIG = json.dumps({
    "methodConfig": [{
        # UNAVAILABLE: no call was answered (a server restarting, loading, draining), so a Generate too
        # is safe to send again
        "name": [{"service": "retrogram.v1.NgramService"}, {"service": "retrogram.v1.RetrieverService"},
                 {"service": "retrogram.v1.DecoderService"}],
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


# ------------------------------------------------------------------------------------ python -> proto

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


def _opt(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


# ------------------------------------------------------------------ requests: arguments -> (message, hint)
# Each builder's signature is its client method's (the table gives the method that signature, plus the
# keyword-only timeout). It returns the request and what the merge or the routing needs of the arguments.

def _count(input_ids):
    return npb.CountRequest(query=query_msg(input_ids)), None


def _count_many(list_of_ids):
    if any(isinstance(q, str) for q in list_of_ids):
        return npb.CountManyRequest(queries=[query_msg(q) for q in list_of_ids]), None
    return npb.CountManyRequest(packed=packed_msg(list_of_ids)), None


def _count_cnf(cnf, max_clause_freq=None, max_diff_tokens=None):
    return npb.CountCnfRequest(cnf=cnf_msg(cnf), **_opt(max_clause_freq=max_clause_freq,
                                                        max_diff_tokens=max_diff_tokens)), None


def _prob(prompt_ids, cont_id: int):
    return npb.ProbRequest(prompt=query_msg(prompt_ids), cont_id=int(cont_id)), None


def _ntd(prompt_ids, max_support=None):
    return npb.NtdRequest(prompt=query_msg(prompt_ids), **_opt(max_support=max_support)), None


def _search_docs(input_ids, maxnum=None, max_disp_len=None):
    return npb.SearchDocsRequest(query=query_msg(input_ids), **_opt(maxnum=maxnum, max_disp_len=max_disp_len)), maxnum


def _search_docs_cnf(cnf, maxnum=None, max_disp_len=None, max_clause_freq=None, max_diff_tokens=None):
    return npb.SearchDocsCnfRequest(cnf=cnf_msg(cnf), **_opt(maxnum=maxnum, max_disp_len=max_disp_len,
                                                             max_clause_freq=max_clause_freq,
                                                             max_diff_tokens=max_diff_tokens)), maxnum


def _get_doc_by_rank(s: int, rank: int, max_disp_len=None):
    return npb.GetDocByRankRequest(s=s, rank=rank, **_opt(max_disp_len=max_disp_len)), s


def _get_doc_by_ix(doc_ix: int, max_disp_len=None):
    return npb.GetDocByIxRequest(doc_ix=doc_ix, **_opt(max_disp_len=max_disp_len)), doc_ix


def _score_sequence(input_ids, block_size: int = 0):
    return npb.ScoreSequenceRequest(query=query_msg(input_ids), block_size=block_size), None


def _tokenize(text: str):
    if not isinstance(text, str):
        raise UserError(f"text: expected a string, got {type(text).__name__}")
    return npb.TokenizeRequest(texts=[text]), None


def _decode(ids):
    ids = [int(t) for t in ids]
    return cpb.PackedQueries(ids=ids, lengths=[len(ids)]), None


def _info():
    return cpb.InfoRequest(), None


def _sampling_msg(params) -> dpb.SamplingParams:
    """retrogram.retro.sampling.SamplingParams (or a dict of its fields) as the proto; not validated here:
    the server answers INVALID_ARGUMENT naming the field."""
    if params is None:
        return dpb.SamplingParams()
    if isinstance(params, dpb.SamplingParams):
        return params
    get = params.get if isinstance(params, dict) else (lambda k, d=None: getattr(params, k, d))
    msg = dpb.SamplingParams(top_k=int(get("top_k", 0) or 0), max_tokens=int(get("max_tokens", 0) or 0),
                             stop=list(get("stop", ()) or ()), stop_token_ids=[int(t) for t in get("stop_token_ids", ()) or ()],
                             ignore_eos=bool(get("ignore_eos", False)), ngram_lambda=float(get("ngram_lambda", 0.0) or 0.0),
                             ngram_lambda_by_length=_lambda_steps(get("ngram_lambda_by_length")))
    for name in ("temperature", "top_p", "repetition_penalty"):
        v = get(name)
        if v is not None:
            setattr(msg, name, float(v))
    if get("seed") is not None:
        msg.seed = int(get("seed"))
    return msg


def _lambda_steps(steps) -> list:
    return [dpb.LambdaStep(min_length=int(a), weight=float(w)) for a, w in (steps or ())]


def _generate(prompt, params=None, chat: bool = False, truncate: bool = False, logprobs: bool = False,
              request_id: str = ""):
    """prompt: a text, token ids, or chat messages ([{"role", "content"}, ...]); chat=True puts a text through
    the model's chat template as a user message. params: SamplingParams or a dict of its fields."""
    req = dpb.GenerateRequest(sampling=_sampling_msg(params), truncate_prompt=truncate, logprobs=logprobs,
                              request_id=request_id)
    if isinstance(prompt, str) and chat:
        req.chat.messages.append(dpb.ChatMessage(role="user", content=prompt))
    elif not isinstance(prompt, str) and len(prompt) and isinstance(prompt[0], dict):
        req.chat.messages.extend(dpb.ChatMessage(role=str(m.get("role", "")), content=str(m.get("content", "")))
                                 for m in prompt)
    else:
        req.text_or_ids.CopyFrom(query_msg(prompt))
        req.text_or_ids.SetInParent()   # set even when empty: the server then says what is missing
    return req, None


def _score_text(text, ngram_lambda: float = 0.0, ngram_lambda_by_length=None):
    return dpb.ScoreRequest(text_or_ids=query_msg(text), ngram_lambda=float(ngram_lambda),
                            ngram_lambda_by_length=_lambda_steps(ngram_lambda_by_length)), None


def _decoder_info():
    return dpb.DecoderInfoRequest(), None


def _load():
    return dpb.LoadRequest(), None


def _is_single(q) -> bool:
    if isinstance(q, (str, rpb.RetrieveQuery)):
        return True
    if isinstance(q, tuple) and len(q) == 2 and q[0] in ("embedding", "ids", "text"):
        return True
    if hasattr(q, "ndim"):
        return q.ndim == 1
    return bool(len(q)) and not isinstance(q[0], (str, tuple, list, rpb.RetrieveQuery)) and not hasattr(q[0], "ndim")


def _retrieve(queries, k: int | None = None, exclude_doc=None, exclude_docs: Iterable[int] | None = None,
              omit_text: bool = False):
    """hint: whether one query was given (its list of neighbours is the answer) or a batch."""
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


def _search(queries, k: int = 2, exclude_doc=None, exclude_docs=None):
    qs = [queries] if isinstance(queries, str) else list(queries)
    if any(not isinstance(q, str) for q in qs):
        raise UserError("queries: expected texts")
    return _retrieve([("text", q) for q in qs], k=k, exclude_doc=exclude_doc, exclude_docs=exclude_docs)[0], None


# -------------------------------------------------------------------- responses: proto -> engine results

def count_dict(r: npb.CountResponse) -> dict:
    out = {"count": r.count, "approx": r.approx}
    if len(r.tokens):   # the ids a text query was tokenized to (a text never tokenizes to nothing that counts)
        out["tokens"] = list(r.tokens)
    return out


def prob_dict(r: npb.ProbResponse) -> dict:
    return {"prompt_cnt": r.prompt_cnt, "cont_cnt": r.cont_cnt, "prob": r.prob}


def infgram_prob_dict(r: npb.InfgramProbResponse) -> dict:
    return {"prompt_cnt": r.prompt_cnt, "cont_cnt": r.cont_cnt, "prob": r.prob, "suffix_len": r.suffix_len}


def ntd_dict(r: npb.NtdResponse) -> dict:
    return {"prompt_cnt": r.prompt_cnt,
            "result_by_token_id": {t: {"cont_cnt": v.cont_cnt, "prob": v.prob}
                                   for t, v in sorted(r.result_by_token_id.items())},
            "approx": r.approx}


def infgram_ntd_dict(r: npb.InfgramNtdResponse) -> dict:
    out = ntd_dict(r)
    out["suffix_len"] = r.suffix_len
    return out


def doc_dict(d: npb.DocResult) -> dict:
    return {"doc_ix": d.doc_ix, "doc_len": d.doc_len, "disp_len": d.disp_len, "needle_offset": d.needle_offset,
            "metadata": d.metadata, "token_ids": list(d.token_ids), "blocked": d.blocked}


def search_dict(r: npb.SearchDocsResponse) -> dict:
    return {"cnt": r.cnt, "approx": r.approx, "idxs": list(r.idxs), "documents": [doc_dict(d) for d in r.documents]}


def score_block_dict(ch: npb.ScoreSequenceChunk) -> dict:
    return {"offset": ch.offset, "prob": list(ch.prob), "suffix_len": list(ch.suffix_len),
            "prompt_cnt": list(ch.prompt_cnt), "cont_cnt": list(ch.cont_cnt), "tokens": list(ch.tokens)}


def info_dict(i: cpb.IndexInfo) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(i, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def neighbour_dict(n: rpb.Neighbour) -> dict:
    """A Neighbour message as retrogram.index.Neighbour.to_dict() gives it."""
    d = n.document
    return {"score": n.score, "chunk_id": n.chunk_id, "doc_id": n.doc_id, "token_offset": n.token_offset,
            "tokens": list(n.tokens), "continuation": list(n.continuation), "text": n.text,
            "continuation_text": n.continuation_text,
            "document": {"source": d.source or None, "external_id": d.external_id or None,
                         "metadata": json.loads(d.metadata) if d.metadata else {}}}


def neighbours_dicts(r: rpb.RetrieveResponse) -> list[list[dict]]:
    return [[neighbour_dict(n) for n in ns.neighbours] for ns in r.results]


_FINISH = {dpb.FINISH_STOP: "stop", dpb.FINISH_LENGTH: "length"}


def generate_event_dict(e: dpb.GenerateEvent) -> dict:
    """{token_ids, text, logprobs, finish_reason (None until the last), usage (the last only), prompt_ids
    (the first only)}, as `retrogram generate --json` prints them."""
    out = {"token_ids": list(e.token_ids), "text": e.text, "logprobs": list(e.logprobs),
           "finish_reason": _FINISH.get(e.finish_reason),
           "usage": _message_dict(e.usage) if e.HasField("usage") else None}
    if len(e.prompt_ids):
        out["prompt_ids"] = list(e.prompt_ids)
    return out


def score_dict(r: dpb.ScoreResponse) -> dict:
    out = {"token_ids": list(r.token_ids), "logprobs": list(r.logprobs), "perplexity": r.perplexity}
    if len(r.mixed_logprobs):
        out.update(mixed_logprobs=list(r.mixed_logprobs), mixed_perplexity=r.mixed_perplexity)
    return out


def _message_dict(m) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def decoder_info_dict(i: dpb.DecoderInfo) -> dict:
    out = _message_dict(i)
    out.setdefault("eos_token_id", None)
    return out


def layout_of(infos: list[dict]) -> ShardLayout:
    """The combined numbering of documents and shards over servers, from their info() dicts."""
    return ShardLayout.of([int(i["num_documents"]) for i in infos], [int(i["num_shards"]) for i in infos])


# ---------------------------------------------------------------------------- merges: results -> result
# merge(results in server order, the request's hint, the servers' layout (several servers, `layout=True`))

def _each(rule: Callable) -> Callable:
    """A rule of ngram.merge that needs nothing but the results."""
    return lambda rs, hint, layout: rule(rs)


def _first(rs, hint, layout):
    return rs[0]


def _all(rs, hint, layout):
    return rs


def _merge_search(rs, maxnum, layout):
    return merge.search_docs(rs, layout.doc_offsets if layout else None, maxnum)


def _merge_doc_by_rank(rs, s, layout):
    return merge.shift_doc(rs[0], layout.doc_offsets[layout.by_shard(s)[0]]) if layout else rs[0]


def _merge_doc_by_ix(rs, doc_ix, layout):
    return merge.shift_doc(rs[0], layout.doc_offsets[layout.by_doc(doc_ix)[0]]) if layout else rs[0]


def _merge_score(parts, hint, layout):
    return merge.score_sequence([merge.score_blocks(p) for p in parts])


def _merge_retrieve(rs, single, layout):
    return rs[0][0] if single else rs[0]


def _merge_search_neighbours(rs, hint, layout):
    from ..index.retriever import Neighbour

    return [[Neighbour(**n) for n in ns] for ns in rs[0]]


# -------------------------------------------------------------------------- routes: which server to ask

def _route_rank(req: npb.GetDocByRankRequest, s: int, layout: ShardLayout):
    k, local = layout.by_shard(s)
    out = npb.GetDocByRankRequest()
    out.CopyFrom(req)
    out.s = local
    return k, out


def _route_ix(req: npb.GetDocByIxRequest, doc_ix: int, layout: ShardLayout):
    k, local = layout.by_doc(doc_ix)
    out = npb.GetDocByIxRequest()
    out.CopyFrom(req)
    out.doc_ix = local
    return k, out


# --------------------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Rpc:
    """One client method. `ask`: "all" (every server, results merged), "first" (the first server),
    "route" (the one server `route(request, hint, layout)` picks, with its own request), "stream" (a
    server-streaming RPC read to the end from every server; `response` per message, `merge` over the lists),
    "iter" (a server-streaming RPC from one server, each message as it arrives)."""

    rpc: str                                   # the gRPC method
    request: Callable[..., tuple[Any, Any]]    # the method's arguments -> (request message, hint for merge/route)
    response: Callable[[Any], Any]             # one server's answer (or streamed message) -> the engine's result
    merge: Callable[[list, Any, ShardLayout | None], Any] | None   # results of the servers asked -> one
    session: bool = False                      # a small call that may go over the Session stream
    ask: str = "all"
    route: Callable | None = None
    layout: bool = False                       # the merge needs the servers' layout (when there are several)
    doc: str = ""
    name: str = ""                             # the client method (set from the table's key)


NGRAM_METHODS: dict[str, Rpc] = {
    "count": Rpc("Count", _count, count_dict, _each(merge.count), session=True,
                 doc="{'count', 'approx'} (and 'tokens' for a text, tokenized by the server)"),
    "count_many": Rpc("CountMany", _count_many, lambda r: list(r.counts), _each(merge.count_many),
                      doc="Counts of many sequences (token ids; texts allowed too) in one call per server."),
    "count_cnf": Rpc("CountCnf", _count_cnf, count_dict, _each(merge.count)),
    "prob": Rpc("Prob", _prob, prob_dict, _each(merge.prob), session=True),
    "ntd": Rpc("Ntd", _ntd, ntd_dict, _each(merge.ntd), session=True),
    "infgram_prob": Rpc("InfgramProb", _prob, infgram_prob_dict, _each(merge.infgram_prob), session=True),
    "infgram_ntd": Rpc("InfgramNtd", _ntd, infgram_ntd_dict, _each(merge.infgram_ntd), session=True),
    "search_docs": Rpc("SearchDocs", _search_docs, search_dict, _merge_search, layout=True),
    "search_docs_cnf": Rpc("SearchDocsCnf", _search_docs_cnf, search_dict, _merge_search, layout=True),
    "get_doc_by_rank": Rpc("GetDocByRank", _get_doc_by_rank, doc_dict, _merge_doc_by_rank, ask="route",
                           route=_route_rank),
    "get_doc_by_ix": Rpc("GetDocByIx", _get_doc_by_ix, doc_dict, _merge_doc_by_ix, ask="route", route=_route_ix),
    "score_sequence": Rpc("ScoreSequence", _score_sequence, score_block_dict, _merge_score, ask="stream",
                          doc="∞-gram probability of every token given all before it: {'prob', 'suffix_len', "
                              "'prompt_cnt', 'cont_cnt', 'tokens'}, one entry per position (streamed from the "
                              "server in blocks)."),
    "iter_score_sequence": Rpc("ScoreSequence", _score_sequence, score_block_dict, None, ask="iter",
                               doc="The blocks of ScoreSequence as they arrive (one server only), each a dict "
                                   "with 'offset'."),
    "tokenize": Rpc("Tokenize", _tokenize, lambda r: list(r.ids), _first, ask="first",
                    doc="The token ids of a text with the index's tokenizer (asked of the first server)."),
    "decode": Rpc("Detokenize", _decode, lambda r: r.texts[0], _first, ask="first"),
    "info": Rpc("Info", _info, info_dict, _all, doc="Each server's IndexInfo, as dicts."),
}

RETRIEVER_METHODS: dict[str, Rpc] = {
    "retrieve": Rpc("Retrieve", _retrieve, neighbours_dicts, _merge_retrieve, ask="first",
                    doc="Neighbours of one query (a list of dicts, best first) or of a batch (a list of such "
                        "lists), as `Retriever.search(...)` gives them (Neighbour.to_dict()). A query is a text, "
                        "token ids, or an embedding (a float numpy vector, or ('embedding', values)). "
                        "exclude_doc: one document id for every query, or one id (or None) per query; "
                        "exclude_docs: ids left out for every query."),
    "search": Rpc("Retrieve", _search, neighbours_dicts, _merge_search_neighbours, ask="first",
                  doc="`Retriever.search` over gRPC: one list of `retrogram.index.retriever.Neighbour` per "
                      "query text."),
    "info": Rpc("Info", _info, info_dict, _all, doc="The server's IndexInfo, as a dict in a list."),
}


DECODER_METHODS: dict[str, Rpc] = {
    "generate": Rpc("Generate", _generate, generate_event_dict, None, ask="iter",
                    doc="The generation's events as they come: dicts {token_ids, text, logprobs (when asked), "
                        "finish_reason (None until the last event), usage (on the last), prompt_ids (on the "
                        "first)}. Closing the iterator (or leaving a `with` / `async with aclosing(...)`) cancels "
                        "the call, and the server stops decoding. No deadline unless `timeout` is given."),
    "score": Rpc("Score", _score_text, score_dict, _first, ask="first",
                 doc="Per-token log-probabilities and perplexity of a text (or token ids) under the LM: {token_ids, "
                     "logprobs (one per token after the first), perplexity}, and mixed_logprobs / mixed_perplexity "
                     "under LM + ∞-gram when ngram_lambda (or ngram_lambda_by_length) is given."),
    "load": Rpc("Load", _load, _message_dict, _first, ask="first",
                doc="The server's load: {running, waiting, max_running, max_waiting, kv_pages_total, kv_pages_free, "
                    "tokens_per_s}."),
    "info": Rpc("Info", _decoder_info, decoder_info_dict, _first, ask="first",
                doc="The model, tokenizer, context, device, KV cache and index the server decodes with."),
}


def _signature(build: Callable) -> inspect.Signature:
    """The client method's signature: self, the builder's parameters, a keyword-only timeout."""
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD), *inspect.signature(build).parameters.values(),
              P("timeout", P.KEYWORD_ONLY, default=None)]
    return inspect.Signature(params)


def _method(name: str, m: Rpc, ask: Callable, aio: bool) -> Callable:
    """The client method of one row: build the request from the arguments, then the base's runner for its
    kind of ask (`_ask_all`, ...)."""
    build = m.request
    if aio and m.ask != "iter":
        async def method(self, *args, timeout=None, **kw):
            req, hint = build(*args, **kw)
            return await ask(self, m, req, hint, timeout)
    else:   # sync, or an async iterator (returned, not awaited)
        def method(self, *args, timeout=None, **kw):
            req, hint = build(*args, **kw)
            return ask(self, m, req, hint, timeout)
    method.__name__ = name
    method.__doc__ = m.doc or f"`Engine.{name}` over gRPC ({m.rpc})."
    method.__signature__ = _signature(build)
    return method


def _attach(cls, table: dict[str, Rpc], aio: bool) -> None:
    """One method on cls per row of the table."""
    for name, m in table.items():
        fn = _method(name, replace(m, name=name), getattr(cls, f"_ask_{m.ask}"), aio)
        fn.__qualname__ = f"{cls.__name__}.{name}"
        setattr(cls, name, fn)


# ----------------------------------------------------------------------------------------- sessions
# Small calls made one after another go over one long-lived Session stream per server (protos/common.proto):
# with grpcio a message on an open stream costs about half of a unary call's round trip (no call set-up,
# headers or status per call). A caller that finds its session busy (another thread or task is using it)
# makes a unary call, so concurrency is unchanged. Any failure of the stream itself (server restarting,
# going away, too many sessions, an old server without Session) sends the call again as a unary call, with
# its retries and errors; every call is a read, so sending twice is safe.

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


def _session_answer(target: str, method: str, resp: cpb.SessionResponse, response_cls):
    if resp.code:
        raise ServiceError(target, method, CODE_BY_VALUE.get(resp.code, grpc.StatusCode.UNKNOWN), resp.message)
    return response_cls.FromString(resp.response)


def _response_classes(service_descriptor) -> dict:
    from google.protobuf import message_factory

    return {m.name: message_factory.GetMessageClass(m.output_type) for m in service_descriptor.methods}


# -------------------------------------------------------------------------------------------- base

class _Base:
    """Channels, stubs and sessions to the servers of one service. A subclass names its service and table:
    `class NgramClient(_SyncBase, service=..., stub=..., table=NGRAM_METHODS)`."""

    service_name = ""
    session_methods: frozenset = frozenset()
    response_classes: dict = {}
    stub_class: Any = None
    max_servers: int | None = None
    aio = False
    # whether a streaming call without its own timeout gets the client's: not for a decoder's generation,
    # which may stream for minutes (it is cancelled by closing its iterator)
    streams_take_timeout = True

    def __init_subclass__(cls, service=None, stub=None, table: dict[str, Rpc] | None = None,
                          max_servers: int | None = None, **kw):
        super().__init_subclass__(**kw)
        if service is not None:
            cls.service_name = service.full_name
            cls.response_classes = _response_classes(service)
            cls.stub_class = stub
            cls.max_servers = max_servers
        if table is not None:
            names = {m.name for m in service.methods} if service is not None else None
            bad = sorted(m.rpc for m in table.values() if names is not None and m.rpc not in names)
            if bad:
                raise TypeError(f"{cls.__name__}: {', '.join(bad)} not methods of {cls.service_name}")
            # the per-token queries a decoder or a scoring loop makes one after another
            cls.session_methods = frozenset(m.rpc for m in table.values() if m.session)
            _attach(cls, table, cls.aio)

    def __init__(self, targets: str | Sequence[str], *, api_key: str | None = None, timeout: float | None = DEFAULT_TIMEOUT_S,
                 tls: bool = False, root_certificates: bytes | str | Path | None = None,
                 client_cert: tuple[bytes, bytes] | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 retries: bool = True, wait_for_ready: bool = False, server_name: str | None = None,
                 sessions: bool = True):
        self.targets = [parse_target(t) for t in ([targets] if isinstance(targets, str) else list(targets))]
        if not self.targets:
            raise UserError("no server given")
        if self.max_servers is not None and len(self.targets) > self.max_servers:
            raise UserError(f"{type(self).__name__} takes one server")
        if isinstance(root_certificates, (str, Path)):
            root_certificates = Path(root_certificates).read_bytes()
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.metadata = ((API_KEY_HEADER, api_key),) if api_key else None
        self.channels = [make_channel(t, tls=tls, root_certificates=root_certificates, client_cert=client_cert,
                                      aio=self.aio, max_message_bytes=max_message_bytes, retries=retries,
                                      server_name=server_name) for t in self.targets]
        self.stubs = [self.stub_class(c) for c in self.channels]
        self._layout: ShardLayout | None = None
        # small calls to one server go over a Session stream (see "sessions" above); sessions=False: never
        self.use_sessions = sessions
        self._sessions: list = [None] * len(self.targets)
        self._session_retry_at = [0.0] * len(self.targets)
        self._session_lock = threading.Lock()

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
                    s = self._sessions[k] = make(self.channels[k], f"/{self.service_name}/{SESSION_METHOD}",
                                                 self.metadata)
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

    def _kw(self, timeout, stream: bool = False) -> dict:
        if timeout is None and (self.streams_take_timeout or not stream):
            timeout = self.timeout
        kw = {"timeout": timeout, "metadata": self.metadata}
        if self.wait_for_ready:
            kw["wait_for_ready"] = True
        return kw

    def _one_server(self, m: Rpc) -> None:
        if len(self.stubs) != 1:
            merged = m.name.removeprefix("iter_")
            raise UserError(f"{m.name} streams from one server; use {merged} with several")


class _SyncBase(_Base):
    # -- one call

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

    def _stream(self, k: int, method: str, request, timeout=None, conv: Callable = lambda x: x):
        """The messages of a server-streaming call, through conv; closing this generator cancels the call."""
        call = getattr(self.stubs[k], method)(request, **self._kw(timeout, stream=True))
        try:
            for x in call:
                yield conv(x)
        except grpc.RpcError as e:
            raise _error(self.targets[k], method, e) from None
        finally:
            call.cancel()   # closed early (the caller stopped reading): the server stops too; a no-op when done

    # -- the kinds of ask (Rpc.ask)

    def _ask_all(self, m: Rpc, req, hint, timeout):
        conv = m.response
        rs = [conv(a) for a in self._call_all(m.rpc, req, timeout)]
        return m.merge(rs, hint, self.layout() if m.layout and len(rs) > 1 else None)

    def _ask_first(self, m: Rpc, req, hint, timeout):
        return m.merge([m.response(self._call(0, m.rpc, req, timeout))], hint, None)

    def _ask_route(self, m: Rpc, req, hint, timeout):
        layout = self.layout() if len(self.stubs) > 1 else None
        k, req = m.route(req, hint, layout) if layout else (0, req)
        return m.merge([m.response(self._call(k, m.rpc, req, timeout))], hint, layout)

    def _ask_stream(self, m: Rpc, req, hint, timeout):
        parts = [list(self._stream(k, m.rpc, req, timeout, m.response)) for k in range(len(self.stubs))]
        return m.merge(parts, hint, None)

    def _ask_iter(self, m: Rpc, req, hint, timeout):
        self._one_server(m)
        return self._stream(0, m.rpc, req, timeout, m.response)

    def layout(self) -> ShardLayout:
        if self._layout is None:
            self._layout = layout_of(self.info())
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
    aio = True

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

    async def _stream(self, k: int, method: str, request, timeout=None, conv: Callable = lambda x: x):
        """The messages of a server-streaming call, through conv; closing this generator cancels the call."""
        call = getattr(self.stubs[k], method)(request, **self._kw(timeout, stream=True))
        try:
            async for x in call:
                yield conv(x)
        except grpc.RpcError as e:
            raise _error(self.targets[k], method, e) from None
        finally:
            call.cancel()   # closed early (aclose): the server stops too; a no-op when done

    async def _ask_all(self, m: Rpc, req, hint, timeout):
        conv = m.response
        rs = [conv(a) for a in await self._call_all(m.rpc, req, timeout)]
        return m.merge(rs, hint, await self.layout() if m.layout and len(rs) > 1 else None)

    async def _ask_first(self, m: Rpc, req, hint, timeout):
        return m.merge([m.response(await self._call(0, m.rpc, req, timeout))], hint, None)

    async def _ask_route(self, m: Rpc, req, hint, timeout):
        layout = await self.layout() if len(self.stubs) > 1 else None
        k, req = m.route(req, hint, layout) if layout else (0, req)
        return m.merge([m.response(await self._call(k, m.rpc, req, timeout))], hint, layout)

    async def _ask_stream(self, m: Rpc, req, hint, timeout):
        async def read(k):
            return [x async for x in self._stream(k, m.rpc, req, timeout, m.response)]

        parts = await asyncio.gather(*(read(k) for k in range(len(self.stubs))))
        return m.merge(list(parts), hint, None)

    def _ask_iter(self, m: Rpc, req, hint, timeout):
        self._one_server(m)
        return self._stream(0, m.rpc, req, timeout, m.response)

    async def layout(self) -> ShardLayout:
        if self._layout is None:
            self._layout = layout_of(await self.info())
        return self._layout

    async def close(self) -> None:
        self._close_sessions()
        for c in self.channels:
            await c.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


# ------------------------------------------------------------------------------------------- clients

_NGRAM = npb.DESCRIPTOR.services_by_name["NgramService"]
_RETRIEVER = rpb.DESCRIPTOR.services_by_name["RetrieverService"]
_DECODER = dpb.DESCRIPTOR.services_by_name["DecoderService"]


class NgramClient(_SyncBase, service=_NGRAM, stub=ngrpc.NgramServiceStub, table=NGRAM_METHODS):
    """The n-gram engine over gRPC (one server, or several shard servers whose answers are combined):
    the methods of NGRAM_METHODS, with Engine's arguments and results (retrogram.ngram.api.NgramQueries)."""


class AsyncNgramClient(_AsyncBase, service=_NGRAM, stub=ngrpc.NgramServiceStub, table=NGRAM_METHODS):
    """NgramClient's methods as coroutines (grpc.aio); same arguments and results
    (retrogram.ngram.api.AsyncNgramQueries). iter_score_sequence is an async iterator."""


class RetrieverClient(_SyncBase, service=_RETRIEVER, stub=rgrpc.RetrieverServiceStub, table=RETRIEVER_METHODS,
                      max_servers=1):
    """The chunk retriever over gRPC."""


class AsyncRetrieverClient(_AsyncBase, service=_RETRIEVER, stub=rgrpc.RetrieverServiceStub,
                           table=RETRIEVER_METHODS, max_servers=1):
    """RetrieverClient's methods as coroutines (grpc.aio)."""


class DecoderClient(_SyncBase, service=_DECODER, stub=dgrpc.DecoderServiceStub, table=DECODER_METHODS,
                    max_servers=1):
    """The decoder over gRPC: generate (an iterator of event dicts), score, load, info.

        with DecoderClient("127.0.0.1:50053") as c:
            for ev in c.generate("Who was Hamlet?", {"max_tokens": 64, "temperature": 0}, chat=True):
                print(ev["text"], end="")
    """

    streams_take_timeout = False


class AsyncDecoderClient(_AsyncBase, service=_DECODER, stub=dgrpc.DecoderServiceStub, table=DECODER_METHODS,
                         max_servers=1):
    """DecoderClient's methods as coroutines (grpc.aio); generate is an async iterator (close it with
    `contextlib.aclosing` to cancel the call when leaving the loop early)."""

    streams_take_timeout = False


# ------------------------------------------------------------------------------------------- CLI hook

def connect(servers: str | Sequence[str], service: str = "ngram", **kw):
    """The client object the CLI uses in place of the engine for `--server`: NgramClient (same methods and
    result dicts as retrogram.ngram.Engine), RetrieverClient or DecoderClient. The API key comes from
    $RETROGRAM_API_KEY when set."""
    kw.setdefault("api_key", env_api_key())
    if service == "ngram":
        return NgramClient(servers, **kw)
    if service == "retriever":
        if not isinstance(servers, str) and len(servers) != 1:
            raise UserError("--server: the retriever is asked of one server")
        return RetrieverClient(servers if isinstance(servers, str) else servers[0], **kw)
    if service == "decoder":
        if not isinstance(servers, str) and len(servers) != 1:
            raise UserError("--server: the decoder is asked of one server")
        return DecoderClient(servers if isinstance(servers, str) else servers[0], **kw)
    raise ValueError(f"unknown service {service!r}")
