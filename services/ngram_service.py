"""NgramService: retrogram.ngram.Engine over gRPC. Proto <-> engine types only; limits on request size.

Each method runs on a worker thread (serving.Server), where the engine's compiled queries release the GIL.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import numpy as np

from ..index.errors import UserError
from ..index.handle import Index
from ..protos import common_pb2 as cpb
from ..protos import ngram_pb2 as pb
from .serving import CallContext, IndexService, invalid, not_found, server_version, too_large

# Request limits: beyond them a call is refused with RESOURCE_EXHAUSTED (saying which limit).
MAX_QUERY_TOKENS = 1 << 16          # tokens in one query (ScoreSequence: MAX_SCORE_TOKENS)
MAX_SCORE_TOKENS = 1 << 22          # tokens in one ScoreSequence request
MAX_BATCH_QUERIES = 1 << 20         # queries in one CountMany
MAX_BATCH_TOKENS = 1 << 23          # tokens in one CountMany
MAX_CNF_TERMS = 256                 # sequences in one CNF query
MAX_MAXNUM = 1000                   # documents per search
MAX_DISP_LEN = 1 << 20              # tokens shown per document
MAX_SUPPORT = 1 << 20               # ntd's max_support
DEFAULT_BLOCK = 4096                # ScoreSequence positions per streamed message
BATCH_STEP = 65536                  # CountMany works in steps of this many queries, checking for cancellation


INLINE_MAX_TOKENS = 64             # Count/Prob/InfgramProb on at most this many ids run on the event loop


def _small_query(q: cpb.Query) -> bool:
    return not q.HasField("text") and len(q.ids) <= INLINE_MAX_TOKENS


def _small_doc(req) -> bool:
    return not req.HasField("max_disp_len") or req.max_disp_len <= 1000


class NgramServicer(IndexService):
    name = "ngram"
    descriptor = pb.DESCRIPTOR.services_by_name["NgramService"]
    # a count over <= 64 ids takes a few microseconds in the compiled engine (bench/results/services.json:
    # the hop to a worker thread alone costs 50-250 µs here), so those run on the event loop
    inline = {"Info": lambda req: True,
              "Count": lambda req: _small_query(req.query),
              "Prob": lambda req: _small_query(req.prompt),
              "InfgramProb": lambda req: _small_query(req.prompt),
              "GetDocByIx": _small_doc,
              "GetDocByRank": _small_doc}

    def __init__(self, index: Index | Path | str):
        super().__init__(index)
        self.engine = None
        self._info: cpb.IndexInfo | None = None

    # -- lifecycle

    def check(self) -> None:
        """A retrogram index needs its tokenize and ngram stages; a bare directory of infini-gram shard
        files is checked by the engine when it opens."""
        from ..index.manifest import MANIFEST

        if self.index is None and not self.index_dir.is_dir():
            raise UserError(f"{self.index_dir}: no such index directory")
        if self.index is not None or (self.index_dir / MANIFEST).is_file():
            self.open_index("ngram")

    def load(self) -> None:
        from ..ngram.engine import Engine

        eng = self.engine = Engine(self.index if self.index is not None else self.index_dir)
        tok = eng.tokenizer_info or {}
        self._info = cpb.IndexInfo(
            index_dir=str(self.index_dir), tokenizer=str(tok.get("name", "")), tokenizer_sha256=str(tok.get("sha256", "")),
            vocab_size=int(eng.vocab_size), token_width=int(eng.width), num_documents=int(eng.get_total_doc_cnt()),
            num_tokens=int(eng.get_total_tok_cnt()), num_shards=int(eng.get_num_shards()), server_version=server_version(),
            eos_token_id=int(eng.eos_token_id))
        self.token_id_max = int(eng.sep)
        # compile and touch the query paths now, so that SERVING means the first call is fast
        for q in ([0], [0, 0]):
            eng.count(q)
            eng.count_many([q])
            eng.prob(q[:-1], q[-1])
            eng.infgram_prob(q[:-1], q[-1])
            eng.ntd(q, max_support=1)
            eng.score_sequence(q)

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    # -- conversions

    def _ids(self, q: cpb.Query, what: str = "query", limit: int = MAX_QUERY_TOKENS) -> list[int]:
        if q.HasField("text"):
            if len(q.ids):
                raise invalid(f"{what}: give text or ids, not both")
            if len(q.text) > 16 * limit:
                raise too_large(f"{what}: text of {len(q.text):,} characters; the limit is {16 * limit:,}")
            ids = self.engine.tokenize(q.text)
        else:
            ids = list(q.ids)
        if len(ids) > limit:
            raise too_large(f"{what}: {len(ids):,} tokens; the limit is {limit:,} per query")
        return ids

    def _cnf(self, cnf: pb.Cnf) -> list[list[list[int]]]:
        if not cnf.clauses:
            raise invalid("cnf: no clauses; expected an AND of at least one OR clause of sequences")
        n = sum(len(c.terms) for c in cnf.clauses)
        if n > MAX_CNF_TERMS:
            raise too_large(f"cnf: {n} sequences; the limit is {MAX_CNF_TERMS}")
        out = []
        for i, clause in enumerate(cnf.clauses):
            if not clause.terms:
                raise invalid(f"cnf: clause {i} is empty; each clause needs at least one sequence")
            terms = []
            for j, t in enumerate(clause.terms):
                ids = self._ids(t, f"cnf clause {i} term {j}")
                if not ids:
                    raise invalid(f"cnf: clause {i} term {j} is an empty sequence")
                terms.append(ids)
            out.append(terms)
        return out

    @staticmethod
    def _opt(msg, field: str, hi: int, lo: int = 1):
        if not msg.HasField(field):
            return None
        v = getattr(msg, field)
        if v < lo:
            raise invalid(f"{field} {v}: expected at least {lo}")
        if v > hi:
            raise too_large(f"{field} {v:,}: the limit is {hi:,}")
        return v

    # -- RPCs

    def Info(self, request, ctx: CallContext):
        return self._info

    def Count(self, request: pb.CountRequest, ctx: CallContext):
        ids = self._ids(request.query)
        r = self.engine.count(ids)
        out = pb.CountResponse(count=r["count"], approx=r["approx"])
        if request.query.HasField("text"):
            out.tokens.extend(ids)
        return out

    def CountMany(self, request: pb.CountManyRequest, ctx: CallContext):
        if len(request.queries) and request.HasField("packed"):
            raise invalid("CountMany: give queries or packed, not both")
        if request.HasField("packed"):
            p = request.packed
            n, n_ids = len(p.lengths), len(p.ids)
        else:
            n = len(request.queries)
        if n > MAX_BATCH_QUERIES:
            raise too_large(f"CountMany: {n:,} queries; the limit is {MAX_BATCH_QUERIES:,}")
        if request.HasField("packed"):
            if n_ids > MAX_BATCH_TOKENS:
                raise too_large(f"CountMany: {n_ids:,} tokens; the limit is {MAX_BATCH_TOKENS:,}")
            ids = np.array(p.ids, dtype=np.int64)   # repeated scalars convert in one copy
            lengths = np.array(p.lengths, dtype=np.int64)
            if int(lengths.sum()) != ids.size:
                raise invalid(f"packed: the lengths add up to {int(lengths.sum()):,} but there are {ids.size:,} ids")
        else:
            queries = [self._ids(q, f"query {i}") for i, q in enumerate(request.queries)]
            lengths = np.array([len(q) for q in queries], dtype=np.int64)
            if int(lengths.sum()) > MAX_BATCH_TOKENS:
                raise too_large(f"CountMany: more than {MAX_BATCH_TOKENS:,} tokens in all")
            ids = np.fromiter(chain.from_iterable(queries), dtype=np.int64, count=int(lengths.sum()))
        ends = np.concatenate([[0], np.cumsum(lengths)])
        out = pb.CountManyResponse()
        for start in range(0, n, BATCH_STEP):   # in steps, checking for cancellation between them
            ctx.check()
            stop = min(start + BATCH_STEP, n)
            counts = self.engine.count_packed(ids[ends[start]:ends[stop]], lengths[start:stop])
            out.counts.extend(counts.tolist())
        out.approx.extend([False] * n)
        return out

    def CountCnf(self, request: pb.CountCnfRequest, ctx: CallContext):
        cnf = self._cnf(request.cnf)
        r = self.engine.count_cnf(cnf, **_kw(max_clause_freq=self._opt(request, "max_clause_freq", 1 << 40),
                                              max_diff_tokens=self._opt(request, "max_diff_tokens", 1 << 20)))
        return pb.CountResponse(count=r["count"], approx=r["approx"])

    def _cont(self, request) -> int:
        if request.cont_id > self.token_id_max:
            raise invalid(f"cont_id {request.cont_id}: beyond the token range [0, {self.token_id_max}]")
        return request.cont_id

    def Prob(self, request: pb.ProbRequest, ctx: CallContext):
        r = self.engine.prob(self._ids(request.prompt, "prompt"), self._cont(request))
        return pb.ProbResponse(prompt_cnt=r["prompt_cnt"], cont_cnt=r["cont_cnt"], prob=r["prob"])

    def InfgramProb(self, request: pb.ProbRequest, ctx: CallContext):
        r = self.engine.infgram_prob(self._ids(request.prompt, "prompt"), self._cont(request))
        return pb.InfgramProbResponse(prompt_cnt=r["prompt_cnt"], cont_cnt=r["cont_cnt"], prob=r["prob"],
                                      suffix_len=r["suffix_len"])

    def _dist(self, msg, r: dict) -> None:
        msg.prompt_cnt = r["prompt_cnt"]
        msg.approx = r["approx"]
        for t, d in r["result_by_token_id"].items():
            e = msg.result_by_token_id[int(t)]
            e.cont_cnt = d["cont_cnt"]
            e.prob = d["prob"]

    def Ntd(self, request: pb.NtdRequest, ctx: CallContext):
        r = self.engine.ntd(self._ids(request.prompt, "prompt"),
                            **_kw(max_support=self._opt(request, "max_support", MAX_SUPPORT)))
        out = pb.NtdResponse()
        self._dist(out, r)
        return out

    def InfgramNtd(self, request: pb.NtdRequest, ctx: CallContext):
        r = self.engine.infgram_ntd(self._ids(request.prompt, "prompt"),
                                    **_kw(max_support=self._opt(request, "max_support", MAX_SUPPORT)))
        out = pb.InfgramNtdResponse(suffix_len=r["suffix_len"])
        self._dist(out, r)
        return out

    def _search(self, r: dict) -> pb.SearchDocsResponse:
        return pb.SearchDocsResponse(cnt=r["cnt"], approx=r["approx"], idxs=[int(i) for i in r["idxs"]],
                                     documents=[_doc(d) for d in r["documents"]])

    def SearchDocs(self, request: pb.SearchDocsRequest, ctx: CallContext):
        ids = self._ids(request.query)
        r = self.engine.search_docs(ids, **_kw(maxnum=self._opt(request, "maxnum", MAX_MAXNUM),
                                               max_disp_len=self._opt(request, "max_disp_len", MAX_DISP_LEN)))
        return self._search(r)

    def SearchDocsCnf(self, request: pb.SearchDocsCnfRequest, ctx: CallContext):
        cnf = self._cnf(request.cnf)
        r = self.engine.search_docs_cnf(cnf, **_kw(
            maxnum=self._opt(request, "maxnum", MAX_MAXNUM),
            max_disp_len=self._opt(request, "max_disp_len", MAX_DISP_LEN),
            max_clause_freq=self._opt(request, "max_clause_freq", 1 << 40),
            max_diff_tokens=self._opt(request, "max_diff_tokens", 1 << 20)))
        return self._search(r)

    def GetDocByRank(self, request: pb.GetDocByRankRequest, ctx: CallContext):
        n = self._info.num_shards
        if request.s >= n:
            raise not_found(f"shard {request.s}: no such shard (this server holds {n}: 0..{n - 1})")
        tok = self.engine.get_tok_cnt(request.s)
        if request.rank >= tok:
            raise not_found(f"rank {request.rank:,}: beyond shard {request.s}'s suffix array ({tok:,} positions)")
        r = self.engine.get_doc_by_rank(request.s, request.rank,
                                        **_kw(max_disp_len=self._opt(request, "max_disp_len", MAX_DISP_LEN)))
        return _doc(r)

    def GetDocByIx(self, request: pb.GetDocByIxRequest, ctx: CallContext):
        n = self._info.num_documents
        if request.doc_ix >= n:
            raise not_found(f"doc_ix {request.doc_ix:,}: no such document (this server holds {n:,}: 0..{n - 1:,})")
        r = self.engine.get_doc_by_ix(request.doc_ix,
                                      **_kw(max_disp_len=self._opt(request, "max_disp_len", MAX_DISP_LEN)))
        return _doc(r)

    def Tokenize(self, request: pb.TokenizeRequest, ctx: CallContext):
        if len(request.texts) > MAX_BATCH_QUERIES:
            raise too_large(f"texts: {len(request.texts):,}; the limit is {MAX_BATCH_QUERIES:,}")
        out = cpb.PackedQueries()
        for i, t in enumerate(request.texts):
            ids = self._ids(cpb.Query(text=t), f"texts[{i}]", MAX_SCORE_TOKENS)
            out.ids.extend(ids)
            out.lengths.append(len(ids))
        return out

    def Detokenize(self, request: cpb.PackedQueries, ctx: CallContext):
        lengths = list(request.lengths)
        if sum(lengths) != len(request.ids):
            raise invalid(f"the lengths add up to {sum(lengths):,} but there are {len(request.ids):,} ids")
        ids = list(request.ids)
        bad = next((t for t in ids if t >= self._info.vocab_size), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary [0, {self._info.vocab_size})")
        out = pb.DetokenizeResponse()
        pos = 0
        for n in lengths:
            out.texts.append(self.engine.decode(ids[pos:pos + n]))
            pos += n
        return out

    def ScoreSequence(self, request: pb.ScoreSequenceRequest, ctx: CallContext):
        ids = self._ids(request.query, "query", MAX_SCORE_TOKENS)
        block = request.block_size or DEFAULT_BLOCK
        if block > MAX_QUERY_TOKENS:
            raise too_large(f"block_size {block:,}: the limit is {MAX_QUERY_TOKENS:,}")
        r = self.engine.score_sequence(ids)
        cols = _score_columns(r, len(ids))
        if not ids:
            return
        for start in range(0, len(ids), block):
            ctx.check()
            end = min(start + block, len(ids))
            yield pb.ScoreSequenceChunk(offset=start, prob=cols["prob"][start:end],
                                        suffix_len=cols["suffix_len"][start:end],
                                        prompt_cnt=cols["prompt_cnt"][start:end], cont_cnt=cols["cont_cnt"][start:end],
                                        tokens=ids[start:end])


# ----------------------------------------------------------------------------------------------- helpers

def _kw(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _doc(d: dict) -> pb.DocResult:
    md = d.get("metadata", "")
    if not isinstance(md, str):
        import json

        md = json.dumps(md, ensure_ascii=False)
    tokens = d.get("token_ids", [])
    return pb.DocResult(doc_ix=d["doc_ix"], doc_len=d["doc_len"], disp_len=d["disp_len"],
                        needle_offset=d.get("needle_offset", 0), metadata=md,
                        token_ids=tokens.tolist() if hasattr(tokens, "tolist") else tokens,
                        blocked=bool(d.get("blocked", False)), shard=int(d.get("shard", 0) or 0))


def _score_columns(r, n: int) -> dict:
    """score_sequence's result as columns of plain lists (prob, suffix_len, prompt_cnt, cont_cnt)."""
    def col(key):
        v = r[key] if isinstance(r, dict) else getattr(r, key)
        return v.tolist() if hasattr(v, "tolist") else list(v)

    return {k: col(k) for k in ("prob", "suffix_len", "prompt_cnt", "cont_cnt")}
