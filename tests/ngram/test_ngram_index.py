"""The `ngram` stage through the real pipeline (SmolLM2 tokens, real text), interoperability with
infini-gram 2.6.0 both ways (its Rust indexer and engine on our files; our engine on an index built
entirely by infini-gram's own indexing script), bad index files, and the `retrogram ngram` CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrogram.index.errors import IndexFormatError, UserError
from retrogram.index.stages.tokenize import TokenStream
from retrogram.ngram import Engine, QueryError
from retrogram.services.cli import main as cli_main


def _build(out: Path, corpus: Path, **options):
    from retrogram.index.build import run_build
    from retrogram.ngram import pipeline_stages

    run_build(out, [str(corpus)], options.pop("tokenizer", None), pipeline_stages(), ["ngram"],
              options={"workers": 1, **options})
    return out


@pytest.fixture(scope="module")
def ngram_index(tmp_path_factory, small_corpus) -> Path:
    return _build(tmp_path_factory.mktemp("ng") / "one", small_corpus)


@pytest.fixture(scope="module")
def sharded_index(tmp_path_factory, small_corpus) -> Path:
    """The same corpus cut into shards of at most 7000 tokens (one document each)."""
    return _build(tmp_path_factory.mktemp("ng") / "many", small_corpus, ngram_shard_tokens=7000)


def _same_ntd(e: Engine, ours: dict, theirs: dict, q: list[int]) -> None:
    """Equal, or infini-gram's known slip (see test_ngram_engine.same_ntd): q ends a shard or precedes eos."""
    if ours != theirs:
        assert theirs["prompt_cnt"] == ours["prompt_cnt"]
        assert (any(sh.tokens[len(sh.tokens) - len(q):].tolist() == q for sh in e.shards)
                or e.count(q + [e.eos_token_id])["count"] > 0)


def _sample_queries(stream: TokenStream, n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(1, 9))
        p = int(rng.integers(0, len(stream.tokens) - L))
        out.append([int(x) for x in stream.tokens[p:p + L]])
    return out


def test_stage_writes_v4_shards_and_documents_keep_their_ids(ngram_index, sharded_index):
    from retrogram.index.manifest import Manifest

    rec = Manifest.load(ngram_index).stages["ngram"]
    assert rec.counts["shards"] == 1 and rec.counts["documents"] == 4
    assert sorted(p.name for p in (ngram_index / "ngram").iterdir()) == [
        "metadata.0", "metaoff.0", "offset.0", "table.0", "tokenized.0"]
    many = Manifest.load(sharded_index).stages["ngram"].counts["shards"]
    assert many >= 3
    stream = TokenStream.open(ngram_index)
    one, sharded = Engine(ngram_index), Engine(sharded_index)
    assert sharded.get_num_shards() == many
    assert one.get_total_tok_cnt() == sharded.get_total_tok_cnt() == len(stream.tokens) + stream.n_docs
    for i in range(stream.n_docs):
        doc = one.get_doc_by_ix(i, 10**6)
        assert doc["token_ids"] == stream.doc(i).tolist() == sharded.get_doc_by_ix(i, 10**6)["token_ids"]
        assert json.loads(doc["metadata"])["doc_id"] == i == one.get_document(i)["id"]
    # counts add up across shards (queries that cross no document boundary give the same counts)
    queries = _sample_queries(stream, 300)
    assert list(one.count_many(queries)) == list(sharded.count_many(queries))
    for q in queries[:60]:
        assert one.ntd(q, 10**6)["result_by_token_id"] == sharded.ntd(q, 10**6)["result_by_token_id"]
        assert one.infgram_prob(q, q[0]) == sharded.infgram_prob(q, q[0])


def test_infinigram_builds_the_same_table_and_answers_the_same(ngram_index, sharded_index, tmp_path_factory):
    from retrogram.ngram.reference import build_table_with_infinigram, copy_shard_inputs, open_infinigram

    # infini-gram's Rust indexer writes garbage below 64 KiB (2-byte pointers) and orders suffixes that
    # agree on more than 100,000 bytes arbitrarily, so the byte-for-byte comparison uses the documents
    # three times over (~150 KB, 3-byte pointers), each copy with shifted ids (no long repeats)
    from retrogram.ngram.build import write_shard

    stream = TokenStream.open(ngram_index)
    root = tmp_path_factory.mktemp("rust")
    docs = [(stream.doc(i).astype(np.int64) + 7 * j) % 49152 for j in range(3) for i in range(stream.n_docs)]
    write_shard(root / "ours", 0, docs, 2)
    copy_shard_inputs(root / "ours", root / "rg")
    build_table_with_infinigram(root / "rg", 0, 2, mem_gib=1, cpus=1)   # 2 parts of < 100 KB overlap badly
    assert (root / "rg" / "table.0").read_bytes() == (root / "ours" / "table.0").read_bytes()

    ours = Engine(ngram_index)
    eos = ours.eos_token_id
    for ig_dirs in ([ngram_index / "ngram"], [sharded_index / "ngram"]):
        ig = open_infinigram(ig_dirs, 2, eos, ours.vocab_size)
        e = Engine(ig_dirs[0].parent)
        stream = TokenStream.open(ngram_index)
        for q in _sample_queries(stream, 80, seed=1):
            assert e.count(q) == ig.count(q)
            assert e.prob(q[:-1], q[-1]) == ig.prob(q[:-1], q[-1])
            _same_ntd(e, e.ntd(q[:-1], 50), ig.ntd(q[:-1], 50), q[:-1])
            assert e.infgram_prob(q, q[-1]) == ig.infgram_prob(q, q[-1])
            ours_ntd = e.infgram_ntd(q, 100)
            _same_ntd(e, ours_ntd, ig.infgram_ntd(q, 100), q[len(q) - ours_ntd["suffix_len"]:])
            cnf = [[q[:1], q[-1:]], [q[1:2] or q[:1]]]
            assert e.count_cnf(cnf, 100, 20) == ig.count_cnf(cnf, 100, 20)
            assert e.find_cnf(cnf, 50000, 5) == ig.find_cnf(cnf, 50000, 5)
        seq = stream.doc(2)[:400].tolist()
        scored = e.score_sequence(seq)
        for i in range(0, len(seq), 7):
            r = ig.infgram_prob(seq[:i], seq[i])
            assert r["prob"] == scored["prob"][i] and r["suffix_len"] == scored["suffix_len"][i]


def test_engine_opens_an_index_built_by_infinigram(tmp_path_factory):
    """infini-gram's own indexing script (UTF-8 bytes as u8 tokens, with metadata) -> our engine."""
    root = tmp_path_factory.mktemp("igbuilt")
    data, save = root / "data", root / "index"
    data.mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "hat", "was", "flat", "and", "dog"]
    # > 64 KiB: infini-gram's Rust indexer fails on smaller files
    texts = [" ".join(rng.choice(words, int(rng.integers(50, 300)))) for _ in range(150)]
    (data / "d.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    subprocess.run([sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(data), "--save_dir", str(save),
                    "--token_dtype", "u8", "--add_metadata", "--cpus", "1", "--mem", "1", "--ulimit", "1024"],
                   check=True, capture_output=True)
    from retrogram.ngram.reference import open_infinigram

    e = Engine(save, eos_token_id=0)
    ig = open_infinigram(save, 1, 0)
    assert e.width == 1 and e.get_total_doc_cnt() == len(texts)
    for word in ["cat", "the ", "at", "a", "mat was", "dog hat", "t t"]:
        q = list(word.encode())
        assert e.count(q) == ig.count(q)
        assert e.count(q)["count"] == sum(len(re.findall(f"(?={re.escape(word)})", t)) for t in texts)
        _same_ntd(e, e.ntd(q), ig.ntd(q), q)
        assert e.search_docs(q)["cnt"] == ig.search_docs(q)["cnt"]
    for i in range(0, len(texts), 7):
        assert e.get_doc_by_ix(i) == ig.get_doc_by_ix(i)
        assert json.loads(e.get_doc_by_ix(i)["metadata"])["metadata"] == {"n": i}


def test_bad_index_files_are_named(ngram_index, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ngram_index / "ngram", bad)
    with pytest.raises(IndexFormatError, match="token_dtype|u8"):
        Engine(bad, token_dtype="u8")
    with open(bad / "table.0", "r+b") as f:
        f.truncate((bad / "table.0").stat().st_size - 3)
    with pytest.raises(IndexFormatError, match=r"table\.0: .* truncated"):
        Engine(bad)
    (bad / "offset.0").unlink()
    with pytest.raises(IndexFormatError, match=r"offset\.0: missing"):
        Engine(bad, token_dtype="u16")
    with pytest.raises(IndexFormatError, match="no tokenized.K files"):
        Engine(tmp_path)
    # a retrogram index whose ngram file changed size: the manifest check names it
    copy = tmp_path / "idx"
    shutil.copytree(ngram_index, copy)
    with open(copy / "ngram" / "tokenized.0", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(IndexFormatError, match=r"tokenized\.0: truncated or changed"):
        Engine(copy)


def test_shards_of_different_tokenizers_are_refused(ngram_index, small_corpus, tmp_path):
    other = _build(tmp_path / "bytes", small_corpus, tokenizer="bytes")
    assert Engine(other).width == 1
    with pytest.raises(IndexFormatError, match="share one tokenizer"):
        Engine([ngram_index, other])
    with pytest.raises(IndexFormatError, match="u8"):
        Engine([ngram_index, other / "ngram"])


def test_text_queries(ngram_index):
    e = Engine(ngram_index)
    text = TokenStream.open(ngram_index)
    phrase = e.decode(text.doc(1)[100:108].tolist())
    ids = e.tokenize(phrase)
    # exact=True: the text's own tokens (the words wherever they stand: tests/services/test_cli_newcomer.py)
    assert e.count_text(phrase, exact=True)["count"] == e.count(ids)["count"] >= 1
    assert e.prob_text(phrase, exact=True) == {**e.prob(ids[:-1], ids[-1]), "forms": [
        {"tokens": ids, "prompt_cnt": e.count(ids[:-1])["count"], "cont_cnt": e.count(ids)["count"]}]}
    assert e.infgram_prob_text(phrase, exact=True)["suffix_len"] == len(ids) - 1
    assert e.search_docs_text(phrase, exact=True)["cnt"] == e.count(ids)["count"]
    scored = e.score_text(phrase)
    assert len(scored["prob"]) == len(ids) and (scored["prob"] > 0).all()
    with pytest.raises(QueryError, match="text: '' has no words"):
        e.prob_text("")


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli(ngram_index, tmp_path, capsys):
    idx = str(ngram_index)
    e = Engine(ngram_index)
    ids = e.tokenize(" the king")
    code, out, _ = _cli(capsys, "ngram", "count", "--index", idx, " the king")   # leading space: as typed
    assert code == 0 and out.splitlines()[0] == str(e.count(ids)["count"])
    code, out, _ = _cli(capsys, "ngram", "count", "--index", idx, "--json", "--ids", ",".join(map(str, ids)))
    assert json.loads(out) == {"count": e.count(ids)["count"], "approx": False, "tokens": ids}
    queries = tmp_path / "q.txt"
    queries.write_text(" the king\n\n my lord\n")
    code, out, _ = _cli(capsys, "ngram", "count", "--index", idx, "--file", str(queries))
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["count"] for x in lines] == [e.count_text(" the king")["count"], e.count_text(" my lord")["count"]]
    code, out, _ = _cli(capsys, "ngram", "prob", "--index", idx, "--json", " the king")
    assert json.loads(out)["cont_cnt"] == e.count(ids)["count"]
    code, out, _ = _cli(capsys, "ngram", "ntd", "--index", idx, " the", "--top", "3")   # the counts, the text's
    assert code == 0 and out.startswith("prompt_cnt=") and len(out.splitlines()) == 1 + 1 + 3   # one form, 3 rows
    code, out, _ = _cli(capsys, "ngram", "infgram-ntd", "--index", idx, "--json", " the king")
    assert "suffix_len" in json.loads(out)
    code, out, _ = _cli(capsys, "ngram", "search", "--index", idx, "--json", "--cnf", " king AND lord OR queen",
                        "--maxnum", "2")
    res = json.loads(out)
    assert res["cnt"] == e.count_cnf_text([["king"], ["lord", "queen"]])["count"]   # terms stripped: the words
    code, out, _ = _cli(capsys, "ngram", "count", "--index", idx, "--cnf", " king AND lord OR queen")
    assert int(out.splitlines()[0]) == res["cnt"]
    code, out, _ = _cli(capsys, "ngram", "doc", "--index", idx, "--json", "1", "--max-disp-len", "5")
    assert json.loads(out)["token_ids"] == TokenStream.open(ngram_index).doc(1)[:5].tolist()
    # bad input: one line on stderr, exit 2
    for argv, message in [
        (["ngram", "count", "--index", idx, "--ids", "1,x"], "--ids: expected comma-separated integer token ids"),
        (["ngram", "count", "--index", idx, "--ids", "65535"], "--ids: token id 65535 is the document separator"),
        (["ngram", "count", "--index", idx, "--ids", "49152"], "--ids: token id 49152 is outside the vocabulary"),
        (["ngram", "ntd", "--index", idx, "--max-support", "0", "x"], "--max-support 0: expected an integer"),
        (["ngram", "search", "--index", idx, "--maxnum", "0", "x"], "--maxnum 0: expected an integer"),
        (["ngram", "count", "--index", idx], "give exactly one query"),
        (["ngram", "count", "--index", str(tmp_path / "nope"), "x"], "no such directory"),
        (["ngram", "doc", "--index", idx, "99"], "DOC_IX: expected an integer in [0, 4)"),
    ]:
        code, out, err = _cli(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
