"""The chunks stage against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from retrogram.index.stages.chunks import CHUNK_LEN, ChunkTable, chunk_boundaries
from retrogram.index.errors import UserError
from retrogram.index.store import open_store



@pytest.fixture(scope="module")
def retrieval_index(tmp_path_factory, small_corpus):
    from retrogram.index.build import run_build
    from retrogram.ngram import pipeline_stages

    out = tmp_path_factory.mktemp("chunks") / "idx"
    run_build(out, [str(small_corpus)], None, pipeline_stages(), ["chunks"], options={"workers": 1})
    return out


def brute_chunks(doc_offsets, n):
    rows = []
    for d in range(len(doc_offsets) - 1):
        lo, hi = int(doc_offsets[d]), int(doc_offsets[d + 1])
        for s in range(lo, hi, n):
            e = min(s + n, hi)
            rows.append((s, d, e - s, int(e - s < n)))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


@pytest.mark.parametrize("lens", [[0], [64], [65, 0, 1, 128, 200], [3, 63, 64, 129], []])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_chunk_boundaries_match_brute_force(lens, n):
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.uint64)
    assert np.array_equal(chunk_boundaries(off, n), brute_chunks(off, n))


def test_chunk_boundaries_random():
    rng = np.random.default_rng(0)
    lens = rng.integers(0, 300, size=200)
    off = np.concatenate([[0], np.cumsum(lens)])
    assert np.array_equal(chunk_boundaries(off, 64), brute_chunks(off, 64))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_chunk_len_validated(bad):
    with pytest.raises(UserError, match="chunk_len"):
        chunk_boundaries(np.array([0, 10]), bad)


def test_chunks_stage_table_and_store(retrieval_index):
    t = ChunkTable.open(retrieval_index)
    ref = brute_chunks(t.stream.doc_offsets, CHUNK_LEN)
    assert np.array_equal(np.asarray(t.rows), ref)
    # chunks never cross documents, only a document's last chunk is short
    docs = ref[:, 1]
    last_of_doc = np.r_[docs[1:] != docs[:-1], True]
    assert not ref[:, 3][~last_of_doc].any()
    db = open_store(retrieval_index)
    rows = list(db.query("SELECT id, doc_id, token_offset, token_len, short FROM chunks ORDER BY id"))
    assert len(rows) == len(ref)
    doc_start = t.stream.doc_offsets.astype(np.int64)
    for r, (off, d, n, short) in zip(rows, ref):
        assert (r["doc_id"], r["token_offset"], r["token_len"], r["short"]) == (d, off - doc_start[d], n, short)
    # a document's chunks are one contiguous id range
    for d in range(t.stream.n_docs):
        lo, hi = t.doc_range(d)
        assert (docs[lo:hi] == d).all() and (lo == hi or docs[lo - 1] != d if lo else True)


def test_continuation_is_next_tokens_of_same_document(retrieval_index):
    t = ChunkTable.open(retrieval_index)
    for cid in range(len(t)):
        off, d, n, _ = (int(x) for x in t.rows[cid])
        end = int(t.stream.doc_offsets[d + 1])
        assert np.array_equal(t.continuation(cid), t.stream.tokens[off + n: min(off + n + 64, end)])
        if cid + 1 < len(t) and int(t.rows[cid + 1][1]) == d:
            assert np.array_equal(t.continuation(cid), t.tokens(cid + 1))
