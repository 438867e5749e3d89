"""retrogram.ngram.merge: the answers of engines over parts of a corpus, combined, equal the answers of one
engine over the whole (the rules the shard clients and the gateway use), with no server in between; and the
query Protocol (ngram/api.py) that Engine satisfies, checked where it must fail too."""

from __future__ import annotations

import json
import random

import pytest

from retrogram.ngram import merge
from retrogram.ngram.merge import ShardLayout


@pytest.fixture(scope="module")
def engines(tmp_path_factory, small_corpus):
    """(whole, [part 0, part 1]): one engine over the corpus, two over its halves (documents 0-1, 2-3)."""
    from conftest import write_jsonl
    from conftest import build_ngram_index

    from retrogram.ngram import Engine

    recs = [json.loads(ln) for ln in small_corpus.read_text().splitlines()]
    root = tmp_path_factory.mktemp("merge")
    whole = Engine(build_ngram_index(root / "whole", small_corpus))
    parts = [Engine(build_ngram_index(root / f"p{i}", write_jsonl(root / f"p{i}.jsonl", recs[i * 2:(i + 1) * 2])))
             for i in range(2)]
    return whole, parts


@pytest.fixture(scope="module")
def queries(engines):
    whole, _ = engines
    texts = [" the king", " my lord", " the", " O Romeo, Romeo", " zzqxj unlikely", ",", " and"]
    return [whole.tokenize(t) for t in texts]


def test_counts_add(engines, queries):
    whole, parts = engines
    for q in queries:
        assert merge.count([p.count(q) for p in parts]) == whole.count(q)
        assert merge.prob([p.prob(q[:-1], q[-1]) for p in parts]) == whole.prob(q[:-1], q[-1])
        got = merge.ntd([p.ntd(q[:-1]) for p in parts])
        want = whole.ntd(q[:-1])
        if not want["approx"]:   # an approximate ntd samples; exact ones add up exactly
            assert got["prompt_cnt"] == want["prompt_cnt"]
            assert {t: v["cont_cnt"] for t, v in got["result_by_token_id"].items()} == \
                {t: v["cont_cnt"] for t, v in want["result_by_token_id"].items()}
            assert {t: v["prob"] for t, v in got["result_by_token_id"].items()} == \
                pytest.approx({t: v["prob"] for t, v in want["result_by_token_id"].items()})
    assert merge.count_many([p.count_many(queries).tolist() for p in parts]) == whole.count_many(queries).tolist()
    cnf = [[queries[0]], [queries[1], queries[2]]]
    assert merge.count([p.count_cnf(cnf) for p in parts]) == whole.count_cnf(cnf)
    one = parts[0].count(queries[0])
    assert merge.count([one]) is one   # one answer is the answer


def test_infgram_takes_the_longest_suffix_found_anywhere(engines, queries):
    whole, parts = engines
    ctx = whole.tokenize(" My lord, the king is dead; long live the king, and O Romeo")
    for i in range(1, len(ctx)):
        prompt, cont = ctx[:i], ctx[i]
        assert merge.infgram_prob([p.infgram_prob(prompt, cont) for p in parts]) == whole.infgram_prob(prompt, cont)
        got, want = merge.infgram_ntd([p.infgram_ntd(prompt) for p in parts]), whole.infgram_ntd(prompt)
        assert got["suffix_len"] == want["suffix_len"]
        if not want["approx"]:
            assert got["prompt_cnt"] == want["prompt_cnt"]
    cols = merge.score_sequence([{k: v.tolist() for k, v in p.score_sequence(ctx).items()} for p in parts])
    want = whole.score_sequence(ctx)
    for key in merge.SCORE_COLUMNS:
        assert cols[key] == pytest.approx(want[key].tolist()), key


def test_documents_are_numbered_across_parts_and_sampled_by_count(engines, queries):
    whole, parts = engines
    layout = ShardLayout.of([p.get_total_doc_cnt() for p in parts], [p.get_num_shards() for p in parts])
    assert layout.num_documents == whole.get_total_doc_cnt() and layout.doc_offsets == (0, 2)
    for ix in range(layout.num_documents):
        k, local = layout.by_doc(ix)
        got, want = merge.shift_doc(parts[k].get_doc_by_ix(local, 40), layout.doc_offsets[k]), whole.get_doc_by_ix(ix, 40)
        same = ("doc_ix", "doc_len", "disp_len", "token_ids")   # (the metadata names each part's own source file)
        assert {f: got[f] for f in same} == {f: want[f] for f in same}
    assert layout.by_shard(0) == (0, 0) and layout.by_shard(1) == (1, 0)
    q = queries[0]
    rng = random.Random(0)
    drawn = {0: 0, 1: 0}
    for _ in range(20):
        r = merge.search_docs([p.search_docs(q, maxnum=5) for p in parts], layout.doc_offsets, 5, rng)
        assert r["cnt"] == whole.count(q)["count"] and len(r["documents"]) == min(5, r["cnt"]) == len(set(r["idxs"]))
        for idx, d in zip(r["idxs"], r["documents"]):
            assert 0 <= idx < r["cnt"]
            full = whole.get_doc_by_ix(d["doc_ix"], max_disp_len=10**6)["token_ids"]
            assert q in [full[i:i + len(q)] for i in range(len(full))]   # a real occurrence, renumbered
            drawn[layout.by_doc(d["doc_ix"])[0]] += 1
    counts = [p.count(q)["count"] for p in parts]
    assert all(drawn[k] > 0 for k in range(2) if counts[k] >= 0.2 * sum(counts))   # each part drawn from
    none = merge.search_docs([p.search_docs(queries[4]) for p in parts], layout.doc_offsets)
    assert none == {"cnt": 0, "approx": False, "idxs": [], "documents": []}


def test_merge_imports_nothing_of_grpc_or_protos():
    import subprocess
    import sys

    code = "import sys; import retrogram.ngram.merge, retrogram.ngram.api; " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google') or 'protos' in m))"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ the Protocol

def test_engine_satisfies_the_query_protocol_and_the_check_can_fail(engines):
    from retrogram.ngram.api import AsyncNgramQueries, NgramQueries, conformance_errors, protocol_methods

    whole, _ = engines
    assert conformance_errors(whole, NgramQueries) == [] and isinstance(whole, NgramQueries)
    assert set(conformance_errors(whole, AsyncNgramQueries)) == {
        f"{m}: not a coroutine function, the protocol's is" for m in protocol_methods(AsyncNgramQueries)}

    class Wrong:
        def count(self, ids):                                   # renamed
            ...

        def prob(self, cont_id, prompt_ids):                    # swapped
            ...

        def ntd(self, prompt_ids, max_support):                 # lost its default
            ...

        def infgram_prob(self, prompt_ids, cont_id, strict):   # one more, required
            ...

        def infgram_ntd(self, prompt_ids, *, max_support=None):  # keyword-only where it was positional
            ...

        async def tokenize(self, text):                         # a coroutine
            ...

    errors = conformance_errors(Wrong, NgramQueries)
    for want in ["count: parameter 'input_ids' missing", "count: parameter 'ids': not in the protocol",
                 "prob: parameter 'prompt_ids': position 1", "ntd: parameter 'max_support': no default",
                 "infgram_prob: parameter 'strict': not in the protocol", "infgram_ntd: parameter 'max_support': position",
                 "tokenize: a coroutine function", "decode: missing", "score_sequence: missing"]:
        assert any(e.startswith(want) for e in errors), (want, errors)
