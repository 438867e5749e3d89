"""The n-gram engine against brute-force numpy counting and against infini-gram 2.6.0's C++ engine, on
synthetic shards written by our builder: small vocabularies (many repeats), several documents and
shards, u8/u16/u32 tokens. Every count, probability, distribution (exact and sampled), ∞-gram result and
CNF result must be identical."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from retrogram.ngram import Engine, QueryError
from retrogram.ngram.build import write_shard
from retrogram.ngram.shards import separator

EOS = 1
SETTINGS = dict(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])


class Corpus:
    """Documents split into shards on disk, the engine and infini-gram's engine on them, and the brute force."""

    def __init__(self, shards: list[list[list[int]]], width: int = 2):
        self.tmp = tempfile.TemporaryDirectory(prefix="rg-")   # no infini-gram keyword in the path
        self.dir = Path(self.tmp.name)
        self.width = width
        for k, docs in enumerate(shards):
            write_shard(self.dir, k, [np.array(d, np.int64) for d in docs], width,
                        metadata=[f'{{"k": {k}, "i": {i}}}' for i in range(len(docs))])
        self.sep = separator(width)
        # brute force: each shard's token stream as infini-gram lays it out
        self.streams = [np.concatenate([np.concatenate([[self.sep], d]) for d in docs]).astype(np.int64)
                        for docs in shards]
        self.engine = Engine(self.dir, eos_token_id=EOS)

    def infinigram(self):
        from retrogram.ngram.reference import open_infinigram

        return open_infinigram(self.dir, self.width, EOS)

    def close(self):
        self.tmp.cleanup()

    # brute force ------------------------------------------------------------------------------------
    def positions(self, q):
        out = []
        for s, ts in enumerate(self.streams):
            m = len(q)
            if m == 0:
                out += [(s, i) for i in range(len(ts))]
                continue
            if m > len(ts):
                continue
            win = np.lib.stride_tricks.sliding_window_view(ts, m)
            out += [(s, int(i)) for i in np.nonzero((win == np.array(q)).all(axis=1))[0]]
        return out

    def count(self, q):
        return len(self.positions(q))

    def next_tokens(self, q):
        nxt = {}
        for s, i in self.positions(q):
            j = i + len(q)
            t = int(self.streams[s][j]) if j < len(self.streams[s]) else EOS
            t = EOS if t == self.sep else t
            nxt[t] = nxt.get(t, 0) + 1
        return nxt

    def longest_suffix(self, prompt):
        L = 0
        while L < len(prompt) and self.count(prompt[len(prompt) - L - 1:]) > 0:
            L += 1
        return L


def same_ntd(ours: dict, theirs: dict, c: Corpus, q: list[int]) -> None:
    """Our ntd equals infini-gram's, except for its one known slip: it maps the shard's end and the
    separator to eos before testing "same next token at both ends of a range", so a range that starts with
    one of (end of shard, eos itself) and ends with another (a separator) is counted as all eos. Ours
    compares the raw next tokens."""
    if ours == theirs:
        return
    kinds = set()   # what follows q where infini-gram reports eos: the shard's end, a separator, eos itself
    for s, i in c.positions(list(q)):
        j = i + len(q)
        nxt = "end" if j == len(c.streams[s]) else int(c.streams[s][j])
        if nxt in ("end", c.sep, EOS):
            kinds.add(nxt)
    assert len(kinds) >= 2, (ours, theirs)
    assert theirs["prompt_cnt"] == ours["prompt_cnt"]
    eos = lambda r: r["result_by_token_id"].get(EOS, {}).get("cont_cnt", 0)  # noqa: E731
    assert eos(theirs) > eos(ours)


token = st.integers(0, 5)   # a small vocabulary: many repeats
doc = st.lists(token, min_size=1, max_size=40)
shard = st.lists(doc, min_size=1, max_size=6)
corpora = st.lists(shard, min_size=1, max_size=3)


@settings(**SETTINGS)
@given(corpora, st.lists(token, min_size=1, max_size=6), st.data())
def test_counts_and_probabilities_match_brute_force(shards, q, data):
    c = Corpus(shards)
    try:
        e = c.engine
        if len(q) > e.get_total_tok_cnt():
            with pytest.raises(QueryError, match="longer than the whole corpus"):
                e.count(q)
            q = q[:1]
        assert e.count(q) == {"count": c.count(q), "approx": False}
        # queries that do occur, n from 1 to the whole document (repeats, document ends)
        s = data.draw(st.integers(0, len(shards) - 1))
        d = data.draw(st.integers(0, len(shards[s]) - 1))
        docu = shards[s][d]
        a = data.draw(st.integers(0, len(docu) - 1))
        b = data.draw(st.integers(a + 1, len(docu)))
        sub = docu[a:b]
        assert e.count(sub)["count"] == c.count(sub) >= 1
        assert list(e.count_many([q, sub, sub[:1]])) == [c.count(q), c.count(sub), c.count(sub[:1])]
        for prompt, cont in ((sub[:-1], sub[-1]), (q[:-1], q[-1]), ([], q[0])):
            pc, cc = c.count(prompt), c.count(prompt + [cont])
            r = e.prob(prompt, cont)
            assert (r["prompt_cnt"], r["cont_cnt"]) == (pc, cc)
            assert r["prob"] == (cc / pc if pc else -1.0)
        # exact next-token distribution (max_support large enough), end of document = eos
        r = e.ntd(sub, max_support=10_000)
        want = c.next_tokens(sub)
        assert r["approx"] is False and r["prompt_cnt"] == c.count(sub)
        assert {t: v["cont_cnt"] for t, v in r["result_by_token_id"].items()} == want
        assert list(r["result_by_token_id"]) == sorted(want)
    finally:
        c.close()


@settings(**SETTINGS)
@given(corpora, st.lists(token, min_size=0, max_size=30))
def test_infgram_and_score_sequence_match_brute_force(shards, seq):
    c = Corpus(shards)
    try:
        e = c.engine
        total = sum(len(t) for t in c.streams)
        assert e.get_total_tok_cnt() == total
        if seq:
            scored = e.score_sequence(seq)
        for i in range(len(seq)):
            prompt, cont = seq[:i], seq[i]
            L = c.longest_suffix(prompt)
            suffix = prompt[len(prompt) - L:]
            pc, cc = c.count(suffix), c.count(suffix + [cont])
            r = e.infgram_prob(prompt, cont)
            assert (r["suffix_len"], r["prompt_cnt"], r["cont_cnt"]) == (L, pc, cc)
            assert (scored["suffix_len"][i], scored["prompt_cnt"][i], scored["cont_cnt"][i]) == (L, pc, cc)
            assert scored["prob"][i] == cc / pc
            n = e.infgram_ntd(prompt, max_support=10_000)
            assert n["suffix_len"] == L and n["prompt_cnt"] == pc
            assert {t: v["cont_cnt"] for t, v in n["result_by_token_id"].items()} == c.next_tokens(suffix)
    finally:
        c.close()


term = st.lists(st.integers(0, 5), min_size=1, max_size=3)
cnfs = st.lists(st.lists(term, min_size=1, max_size=3), min_size=1, max_size=3)


@settings(**SETTINGS)
@given(corpora, cnfs, st.lists(token, min_size=0, max_size=5), st.sampled_from([1, 2, 4]),
       st.integers(1, 40), st.integers(1, 12), st.integers(1, 40))
def test_every_query_identical_to_infinigram(shards, cnf, prompt, width, max_support, max_diff, max_clause_freq):
    """Sampled ntd (approx), CNF counts with subsampling, documents: infini-gram's engine on the same files."""
    c = Corpus(shards, width)
    try:
        e, ig = c.engine, c.infinigram()
        flat = [t for clause in cnf for term in clause for t in term]
        total = e.get_total_tok_cnt()
        if any(len(term) > total for clause in cnf for term in clause):
            with pytest.raises(QueryError, match="longer than the whole corpus"):
                e.count_cnf(cnf)
            cnf = [[term[:1] for term in clause] for clause in cnf]
        for q in (prompt, flat, flat[:2]):
            if len(q) > total:
                with pytest.raises(QueryError, match="longer than the whole corpus"):
                    e.ntd(q)
                continue
            if q:
                assert e.count(q) == ig.count(q)
                assert e.find(q) == ig.find(q)
                assert e.prob(q[:-1], q[-1]) == ig.prob(q[:-1], q[-1])
                assert e.infgram_prob(q[:-1], q[-1]) == ig.infgram_prob(q[:-1], q[-1])
            same_ntd(e.ntd(q, max_support), ig.ntd(q, max_support), c, q)
            ours, theirs = e.infgram_ntd(q, max_support), ig.infgram_ntd(q, max_support)
            assert ours["suffix_len"] == theirs["suffix_len"]
            same_ntd(ours, theirs, c, q[len(q) - ours["suffix_len"]:])
        assert e.count_cnf(cnf, max_clause_freq, max_diff) == ig.count_cnf(cnf, max_clause_freq, max_diff)
        assert e.find_cnf(cnf, max_clause_freq, max_diff) == ig.find_cnf(cnf, max_clause_freq, max_diff)
        assert e.get_total_doc_cnt() == ig.get_total_doc_cnt()
        for ix in range(e.get_total_doc_cnt()):
            assert e.get_doc_by_ix(ix, 7) == ig.get_doc_by_ix(ix, 7)
        for s in range(e.get_num_shards()):
            for rank in range(0, e.get_tok_cnt(s), 3):
                ours, theirs = e.get_doc_by_rank(s, rank, 5), ig.get_doc_by_rank(s, rank, 5)
                if theirs["needle_offset"] > theirs["doc_len"]:   # a separator's rank: infini-gram's unsigned -1
                    theirs["needle_offset"] = -1
                assert ours == theirs
    finally:
        c.close()


@settings(**SETTINGS)
@given(corpora, term, st.integers(1, 5))
def test_search_docs_draws_real_matches(shards, q, maxnum):
    c = Corpus(shards)
    try:
        e, ig = c.engine, c.infinigram()
        q = q[:e.get_total_tok_cnt()]   # longer queries are refused (tested above)
        r = e.search_docs(q, maxnum=maxnum, max_disp_len=9)
        assert (r["cnt"], r["approx"]) == (ig.search_docs(q, maxnum)["cnt"], False)
        if r["cnt"] == 0:
            assert r["idxs"] == r["documents"] == []
            return
        assert len(r["idxs"]) == len(r["documents"]) == min(maxnum, r["cnt"])
        assert len(set(r["idxs"])) == len(r["idxs"]), "one match drawn twice"
        seg = e.find(q)["segment_by_shard"]
        for idx, d in zip(r["idxs"], r["documents"]):
            assert 0 <= idx < r["cnt"]
            s = 0   # the idx-th match, as infini-gram numbers them: shard by shard, rank order
            while idx >= seg[s][1] - seg[s][0]:
                idx -= seg[s][1] - seg[s][0]
                s += 1
            assert d == ig.get_doc_by_rank(s, seg[s][0] + idx, 9)
            assert d["token_ids"][d["needle_offset"]:d["needle_offset"] + len(q)] == q[:d["disp_len"] - d["needle_offset"]]
    finally:
        c.close()


def test_adversarial_repeats_and_separators():
    """One token repeated (every suffix shares long prefixes), documents of one token, shard boundaries."""
    shards = [[[3] * 50, [3]], [[3, 3, 4] * 10, [4]], [[3] * 7]]
    c = Corpus(shards)
    try:
        e, ig = c.engine, c.infinigram()
        for n in range(1, 52):
            assert e.count([3] * n)["count"] == c.count([3] * n)
            ours = e.ntd([3] * n, 10_000)
            assert {t: v["cont_cnt"] for t, v in ours["result_by_token_id"].items()} == c.next_tokens([3] * n)
            same_ntd(ours, ig.ntd([3] * n, 10_000), c, [3] * n)
            same_ntd(e.ntd([3] * n, 3), ig.ntd([3] * n, 3), c, [3] * n)
        seq = [3] * 60 + [4, 3, 3, 4] * 5
        scored = e.score_sequence(seq)
        for i in range(len(seq)):
            r = ig.infgram_prob(seq[:i], seq[i])
            assert (r["suffix_len"], r["prompt_cnt"], r["cont_cnt"]) == (
                scored["suffix_len"][i], scored["prompt_cnt"][i], scored["cont_cnt"][i])
        assert e.count_cnf([[[3]], [[4]]], 5, 3) == ig.count_cnf([[[3]], [[4]]], 5, 3)
        assert e.find_cnf([[[3, 3]], [[4], [3, 4]]], 50000, 2) == ig.find_cnf([[[3, 3]], [[4], [3, 4]]], 50000, 2)
    finally:
        c.close()


def test_bad_queries_name_the_argument():
    c = Corpus([[[1, 2, 3], [2, 3]]])
    try:
        e = Engine(c.dir, eos_token_id=EOS, vocab_size=10)
        cases = [
            (lambda: e.count([]), "input_ids: empty query"),
            (lambda: e.count([1, 10]), "input_ids: token id 10 is outside the vocabulary"),
            (lambda: e.count([-1]), "input_ids: token id -1"),
            (lambda: e.count([1.5]), "input_ids: expected a list of integer token ids"),
            (lambda: e.count("abc"), "input_ids: expected a list of token ids"),
            (lambda: e.count([2] * 20), "input_ids: 20 tokens, longer than the whole corpus"),
            (lambda: e.prob([1], 65535), "cont_id: token id 65535"),
            (lambda: e.prob([1], "2"), "cont_id: expected one integer"),
            (lambda: e.ntd([1], max_support=0), "max_support: expected an integer in [1,"),
            (lambda: e.search_docs([1], maxnum=0), "maxnum: expected an integer"),
            (lambda: e.search_docs([1], maxnum=10**9), "maxnum: expected an integer"),
            (lambda: e.count_cnf([]), "cnf: expected a non-empty list"),
            (lambda: e.count_cnf([[]]), "cnf: clause 0 is not a non-empty list"),
            (lambda: e.count_cnf([[[1], []]]), "cnf clause 0 term 1: empty query"),
            (lambda: e.get_doc_by_ix(2), "doc_ix: expected an integer in [0, 2)"),
            (lambda: e.get_doc_by_rank(1, 0), "s: expected a shard number in [0, 1)"),
            (lambda: e.get_doc_by_rank(0, 99), "rank: expected an integer in [0, 7)"),
            (lambda: e.count_text("x"), "text queries need a retrogram index"),
        ]
        for call, message in cases:
            with pytest.raises(QueryError if "retrogram index" not in message else Exception, match=None) as ei:
                call()
            assert message in str(ei.value), (message, str(ei.value))
        with pytest.raises(QueryError, match="separator"):
            Engine(c.dir, eos_token_id=EOS).count([65535])
    finally:
        c.close()


def test_threads_query_in_parallel_with_identical_results():
    rng = np.random.default_rng(0)
    shards = [[list(rng.integers(0, 20, 300)) for _ in range(20)] for _ in range(2)]
    c = Corpus(shards)
    try:
        e = c.engine
        queries = [list(map(int, rng.integers(0, 20, rng.integers(1, 4)))) for _ in range(200)]
        want = [(e.count(q), e.ntd(q, 50), e.infgram_prob(q, 3)) for q in queries]
        got = [None] * len(queries)

        def work(i0):
            for i in range(i0, len(queries), 4):
                q = queries[i]
                got[i] = (e.count(q), e.ntd(q, 50), e.infgram_prob(q, 3))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert got == want
    finally:
        c.close()


@settings(**SETTINGS)
@given(corpora, st.sampled_from([1, 2, 4]), st.lists(st.lists(token, min_size=1, max_size=8), min_size=0, max_size=80),
       st.data())
def test_count_many_matches_brute_force(shards, width, queries, data):
    """count_many's lockstep searches (more queries than one lockstep group, absent and present ones, every
    token width) give each query's brute-force count; the prefix buckets are each key's first rank."""
    c = Corpus(shards, width)
    try:
        e = c.engine
        for s, ts in enumerate(c.streams):   # buckets: how many suffixes have a smaller first-bytes key
            raw = ts.astype(e.token_dtype).view(np.uint8)
            kb = 1 if width == 1 else 2
            keys = raw.reshape(-1, width)[:, 0].astype(np.int64)
            if kb == 2:
                keys = (keys << 8) | raw.reshape(-1, width)[:, 1]
            want = np.searchsorted(np.sort(keys), np.arange((1 << (8 * kb)) + 1))
            assert np.array_equal(e.shards[s].buckets, want)
        present = []
        for _ in range(data.draw(st.integers(0, 40))):
            ts = c.streams[data.draw(st.integers(0, len(c.streams) - 1))]
            a = data.draw(st.integers(0, len(ts) - 1))
            present.append([int(t) for t in ts[a:a + data.draw(st.integers(1, 6))] if t != c.sep] or [0])
        qs = queries + present
        got = e.count_many(qs)
        assert got.dtype == np.int64 and list(got) == [c.count(q) for q in qs]
        assert list(e.count_many(tuple(np.array(q) for q in qs))) == list(got)   # the slow path agrees
        flat = np.array([t for q in qs for t in q], np.int64)
        assert list(e.count_packed(flat, [len(q) for q in qs])) == list(got)
    finally:
        c.close()


def test_count_many_names_the_bad_query():
    c = Corpus([[[1, 2, 3], [2, 3]]])
    try:
        e = Engine(c.dir, eos_token_id=EOS, vocab_size=10)
        assert list(e.count_many([])) == []
        for qs, message in (([[1], [2, 10]], "list_of_ids[1]: token id 10 is outside the vocabulary"),
                            ([[1], [], [2]], "list_of_ids[1]: empty query"),
                            ([[1], [-1]], "list_of_ids[1]: token id -1"),
                            ([[1], [1.5]], "list_of_ids[1]: expected a list of integer token ids"),
                            ([[1], "ab"], "list_of_ids[1]: expected a list of token ids")):
            with pytest.raises(QueryError) as ei:
                e.count_many(qs)
            assert message in str(ei.value), (message, str(ei.value))
        with pytest.raises(QueryError, match="list_of_ids: expected a list"):
            e.count_many(np.zeros((2, 2), np.int64))
        assert list(e.count_packed([], [])) == []
        for ids, lengths, message in (([1, 2, 10], [1, 2], "list_of_ids[1]: token id 10 is outside the vocabulary"),
                                      ([1, 2], [1, 0, 1], "list_of_ids[1]: empty query"),
                                      ([1, -1], [1, 1], "list_of_ids[1]: token id -1"),
                                      ([1, 2], [1], "lengths: they add up to 1 but there are 2 ids"),
                                      ([1.5], [1], "ids: expected a 1-d array of integers"),
                                      ([[1]], [1], "ids: expected a 1-d array of integers")):
            with pytest.raises(QueryError) as ei:
                e.count_packed(ids, lengths)
            assert message in str(ei.value), (message, str(ei.value))
    finally:
        c.close()


@settings(**SETTINGS)
@given(st.integers(0, 2000), st.sampled_from([1, 100, 1 << 20, 1 << 33, 1 << 45]), st.integers(0, 2**32))
def test_radix_sort_and_directory_lookups(n, bound, seed):
    from retrogram.ngram.suffix_array import _directory, _first_at_least, _radix_sort

    rng = np.random.default_rng(seed)
    x = rng.integers(0, bound, n) if rng.random() < 0.5 else rng.integers(0, min(bound, 7), n)
    got = _radix_sort(x.copy(), bound)
    assert np.array_equal(got, np.sort(x))
    cells, shift = _directory(got, bound)
    for v in list(rng.integers(0, bound, 50)) + [0, bound - 1] + list(got[:20]):
        assert _first_at_least(got, cells, shift, int(v)) == np.searchsorted(got, v)


@pytest.mark.parametrize("width", [1, 2])
def test_cnf_with_large_clauses_identical_to_infinigram(width):
    """Clauses of thousands of matches (the radix-sorted merge), subsampled or not, several shards."""
    rng = np.random.default_rng(width)
    shards = [[list(map(int, rng.integers(0, 6, rng.integers(50, 400)))) for _ in range(30)] for _ in range(2)]
    c = Corpus(shards, width)
    try:
        e, ig = c.engine, c.infinigram()
        cnfs = [[[[0]], [[1]]], [[[2, 3]], [[4], [5, 0]]], [[[1]], [[2]], [[3], [4]]], [[[0, 0]], [[5]]]]
        for cnf in cnfs:
            for mcf, mdt in ((50000, 100), (50000, 3), (700, 10), (90, 40), (3, 1)):
                assert e.find_cnf(cnf, mcf, mdt) == ig.find_cnf(cnf, mcf, mdt), (cnf, mcf, mdt)
                assert e.count_cnf(cnf, mcf, mdt) == ig.count_cnf(cnf, mcf, mdt)
    finally:
        c.close()


@settings(**SETTINGS)
@given(st.integers(0, 2**32), st.integers(1, 300), st.integers(1, 12), st.integers(1, 4))
def test_both_cnf_merges_find_the_same_neighbours(seed, n, max_diff, n_terms):
    """The two ways of merging a clause into the candidates (sort the clause's matches / index the
    candidates) agree with each other and with a direct scan, whichever set is the larger."""
    from retrogram.ngram.suffix_array import _nearest_by_indexing_candidates, _nearest_by_sorting_matches

    rng = np.random.default_rng(seed)
    c = Corpus([[list(map(int, rng.integers(0, 4, rng.integers(20, 200)))) for _ in range(8)] for _ in range(2)])
    try:
        e, w = c.engine, c.width
        terms = [list(map(int, rng.integers(0, 4, rng.integers(1, 3)))) for _ in range(n_terms)]
        seg = np.array([e.find(t)["segment_by_shard"] for t in terms], np.int64)   # [term, shard, 2]
        span = max_diff * w
        for s in range(len(c.streams)):
            size = len(c.streams[s]) * w
            ls = rng.integers(0, len(c.streams[s]), n) * w
            rs = np.minimum(ls + rng.integers(0, 3 * span + 1, n) // w * w, size - w)
            ls = np.minimum(ls, rs)
            a = _nearest_by_sorting_matches(e._table, s, seg, 0, len(terms), ls, rs, span, size)
            b = _nearest_by_indexing_candidates(e._table, s, seg, 0, len(terms), ls, rs, span, size)
            matches = np.array(sorted(p * w for t in terms for _, p in c.positions(t) if _ == s) or [-10**9])
            want_l = [max([p for p in matches if l - span <= p < r], default=-1) for l, r in zip(ls, rs)]
            want_r = [min([p for p in matches if l <= p <= r + span], default=-1) for l, r in zip(ls, rs)]
            assert list(a[0]) == list(b[0]) == want_l
            assert list(a[1]) == list(b[1]) == want_r
    finally:
        c.close()


@pytest.mark.parametrize("n, k", [(5, 3), (10, 10), (7, 20), (100_000, 5), (1_000, 100)])
def test_distinct_draws_are_distinct_in_range_and_uniform(n, k):
    from retrogram.ngram.engine import distinct_draws

    hits = np.zeros(n)
    rounds = 4000 if n < 2000 else 50
    for _ in range(rounds):
        d = distinct_draws(n, k)
        assert len(d) == min(n, k) and len(np.unique(d)) == len(d) and (np.diff(d) > 0).all()
        assert d.min() >= 0 and d.max() < n
        hits[d] += 1
    if n < 2000:   # every value drawn about rounds * k / n times
        expect = rounds * min(n, k) / n
        assert np.abs(hits - expect).max() < 6 * np.sqrt(expect) + 1
