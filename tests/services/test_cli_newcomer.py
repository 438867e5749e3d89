"""Issue 14's "first hour" of a new user: what the CLI and the Python API print, where, and what they count.

Real indexes built through the pipeline, the real CLI (in process, or as `retrogram` in a child process
where exit codes, streams or servers matter)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)


def _env(**kw) -> dict:
    """The environment of a child process as a user has it: no settings that quiet transformers."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env.update(HF_HUB_OFFLINE="1", **kw)
    return env


def test_python_api_loads_the_embedder_without_transformers_bars():
    """Embedder.load() (the Python API: no CLI set-up) prints no weight-loading bar, and leaves transformers'
    own settings as it found them."""
    code = ("from transformers.utils import logging as l\n"
            "from retrogram.index.embedder import Embedder\n"
            "e = Embedder.load(device='cpu')\n"
            "print(e.dim, l.is_progress_bar_enabled(), l.get_verbosity())\n")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr
    from transformers.utils import logging as hf_logging

    assert r.stdout.split() == ["384", "True", str(hf_logging.WARNING)]
    assert "Loading weights" not in r.stderr and "it/s" not in r.stderr, r.stderr


# ------------------------------------------------------------------------- an n-gram index, the CLI in process

def _cli(capsys, *argv) -> tuple[int, str, str]:
    from retrogram.services.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ngram_index(tmp_path_factory, small_corpus):
    from retrogram.services.cli import main

    out = tmp_path_factory.mktemp("newcomer") / "idx"
    assert main(["build-index", "--corpus", str(small_corpus), "--out", str(out), "--stages", "tokenize,ngram",
                 "--workers", "1", "--no-progress"]) == 0
    return out


def _brute_count(docs: list[list[int]], seq: list[int]) -> int:
    """Occurrences of a token sequence in the documents, by looking at every position."""
    n = len(seq)
    return sum(d[i:i + n] == seq for d in docs for i in range(len(d) - n + 1))


@pytest.fixture(scope="module")
def docs(ngram_index) -> list[list[int]]:
    """Every document's token ids (from the n-gram shards, whose tokens are the token stream's)."""
    from retrogram.ngram import Engine

    e = Engine(ngram_index)
    return [e.get_doc_by_ix(i, 10_000_000)["token_ids"] for i in range(e.get_total_doc_cnt())]


# ------------------------------------------------------------------------------- text queries: the words

def _line_start_phrase(small_corpus) -> str:
    """Three words that open a line of the corpus (mid-line or not elsewhere)."""
    import json

    text = json.loads(small_corpus.read_text().splitlines()[1])["text"]
    for line in text.splitlines()[40:]:
        words = line.split()
        if len(words) >= 4 and all(w.isalpha() for w in words[:3]) and not line[0].isspace():
            return " ".join(words[:3])
    raise AssertionError("no line to take a phrase from")


def test_text_queries_count_the_words_wherever_they_stand(ngram_index, docs, small_corpus, capsys):
    from retrogram.ngram import Engine

    e = Engine(ngram_index)
    tok = e.tokenize
    for text in ["king", "my lord", _line_start_phrase(small_corpus)]:
        mid, start = tok(" " + text), tok("\n" + text)
        assert e.decode(mid) == " " + text and e.decode(start) == "\n" + text
        want = _brute_count(docs, mid) + _brute_count(docs, start)
        code, out, _ = _cli(capsys, "ngram", "count", "--index", ngram_index, text, "--json")
        assert code == 0
        assert json.loads(out) == {"count": want, "approx": False, "forms": [
            {"tokens": mid, "count": _brute_count(docs, mid)}, {"tokens": start, "count": _brute_count(docs, start)}]}
        assert e.count_text(text)["count"] == want
        code, out, _ = _cli(capsys, "ngram", "count", "--index", ngram_index, text)   # the ids shown without --json
        lines = out.splitlines()
        assert lines[0] == str(want) and ",".join(map(str, mid)) in lines[1] and ",".join(map(str, start)) in lines[2]
        # --exact: the text's own tokens, as typed
        code, out, _ = _cli(capsys, "ngram", "count", "--index", ngram_index, text, "--json", "--exact")
        assert json.loads(out)["count"] == _brute_count(docs, tok(text)) and json.loads(out)["forms"][0]["tokens"] == tok(text)
    phrase = _line_start_phrase(small_corpus)
    assert _brute_count(docs, tok("\n" + phrase)) >= 1   # the line-start form is what finds this one
    # the help's CNF example: every term in both forms, each an alternative of its clause
    code, out, _ = _cli(capsys, "ngram", "count", "--index", ngram_index, "--cnf", "king AND queen OR prince", "--json")
    res = json.loads(out)
    forms = [e.text_forms(t) for t in ("king", "queen", "prince")]
    assert res["cnf"] == [forms[0], forms[1] + forms[2]]
    assert res["count"] == e.count_cnf([forms[0], forms[1] + forms[2]])["count"] > 0
    # prob and ntd: both forms' counts added; the infgram ops back off along the mid-line form
    mid, start = tok(" my good"), tok("\nmy good")
    code, out, _ = _cli(capsys, "ngram", "prob", "--index", ngram_index, "my good", "--json")
    r = json.loads(out)
    assert [f["tokens"] for f in r["forms"]] == [mid, start]
    assert r["cont_cnt"] == _brute_count(docs, mid) + _brute_count(docs, start) > 0
    assert r["prompt_cnt"] == _brute_count(docs, mid[:-1]) + _brute_count(docs, start[:-1])
    code, out, _ = _cli(capsys, "ngram", "ntd", "--index", ngram_index, "my", "--json")
    r = json.loads(out)
    assert r["prompt_cnt"] == _brute_count(docs, tok(" my")) + _brute_count(docs, tok("\nmy"))
    assert r["result_by_token_id"][str(mid[-1])]["cont_cnt"] == _brute_count(docs, mid) + _brute_count(docs, start)
    code, out, _ = _cli(capsys, "ngram", "prob", "--index", ngram_index, "my good")   # ids shown without --json
    assert ",".join(map(str, mid)) in out and ",".join(map(str, start)) in out
    code, out, _ = _cli(capsys, "ngram", "infgram-prob", "--index", ngram_index, "my good", "--json")
    assert json.loads(out)["tokens"] == mid


# ------------------------------------------------------------------------------- search: distinct matches

def _is_match(d: dict, forms: list[list[int]]) -> bool:
    t, at = d["token_ids"], d["needle_offset"]
    return any(t[at:at + len(f)] == f for f in forms)


def test_search_never_draws_one_match_twice(ngram_index, docs, capsys):
    """`--maxnum N` shows min(N, cnt) different occurrences: drawing with replacement (as infini-gram does)
    showed the one match of a rare phrase N times, each "match 0"."""
    from retrogram.ngram import Engine

    e = Engine(ngram_index)
    rare = next(d[i:i + 6] for d in docs for i in range(200, len(d), 97) if _brute_count(docs, d[i:i + 6]) == 1)
    for maxnum in (2, 5):
        r = e.search_docs(rare, maxnum=maxnum, max_disp_len=20)
        assert r["cnt"] == 1 and r["idxs"] == [0] and len(r["documents"]) == 1 and _is_match(r["documents"][0], [rare])
        code, out, _ = _cli(capsys, "ngram", "search", "--index", ngram_index, "--ids", ",".join(map(str, rare)),
                            "--maxnum", maxnum, "--max-disp-len", 20)
        assert code == 0 and out.count("--- match ") == 1, out
    few = e.tokenize(" my lord")
    cnt = _brute_count(docs, few)
    assert cnt >= 3
    r = e.search_docs(few, maxnum=cnt + 3, max_disp_len=9)
    assert r["idxs"] == list(range(cnt)) and all(_is_match(d, [few]) for d in r["documents"])
    r = e.search_docs(few, maxnum=cnt - 1, max_disp_len=9)
    assert len(set(r["idxs"])) == len(r["documents"]) == cnt - 1
    # the words' forms together, and a CNF: every draw a different match too
    forms = e.text_forms("my lord")
    code, out, _ = _cli(capsys, "ngram", "search", "--index", ngram_index, "my lord", "--maxnum", 10_000, "--json")
    r = json.loads(out)
    total = sum(_brute_count(docs, f) for f in forms)
    assert r["cnt"] == total and sorted(r["idxs"]) == list(range(total)) and all(_is_match(d, forms) for d in r["documents"])
    cnf = [[e.tokenize(" my")], [e.tokenize(" good")]]
    ptrs = e.find_cnf(cnf)["ptrs_by_shard"][0]
    assert len(set(ptrs)) < len(ptrs), "find_cnf lists one location once per pairing: the test needs such a case"
    r = e.search_docs_cnf(cnf, maxnum=10_000, max_disp_len=9)
    assert r["cnt"] == len(ptrs) and len(set(r["idxs"])) == len(r["documents"]) == len(set(ptrs))
    assert all(_is_match(d, [t for clause in cnf for t in clause]) for d in r["documents"])


# ------------------------------------------------------------------------------- errors name the flags

def test_errors_name_the_flag_not_the_engine_argument(ngram_index, small_corpus, tmp_path, capsys):
    idx = str(ngram_index)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("1,2\n3,49152\n")
    for argv, message in [
        (["ngram", "count", "--index", idx, "--ids", "49152"], "--ids: token id 49152 is outside the vocabulary"),
        (["ngram", "prob", "--index", idx, "--ids", "1,49152"], "--ids: token id 49152 is outside the vocabulary"),
        (["ngram", "count", "--index", idx, "--ids", "65535"], "--ids: token id 65535 is the document separator"),
        (["ngram", "count", "--index", idx, "--cnf", "1 AND 49152", "--ids-per-line"],
         "--cnf clause 1 term 0: token id 49152 is outside the vocabulary"),
        (["ngram", "count", "--index", idx, "--file", ids_file, "--ids-per-line"],
         f"--file {ids_file} line 2: token id 49152 is outside the vocabulary"),
        (["ngram", "count", "--index", idx, "   "], "TEXT: '   ' has no words to look for"),
        (["ngram", "ntd", "--index", idx, "--top", "-1", "my lord"], "--top -1: expected a positive number"),
        (["ngram", "ntd", "--index", idx, "--top", "0", "my lord"], "--top 0: expected a positive number"),
        (["ngram", "ntd", "--index", idx, "--max-support", "0", "x"], "--max-support 0: expected an integer in [1, "),
        (["ngram", "search", "--index", idx, "--maxnum", "0", "x"], "--maxnum 0: expected an integer in [1, 10,000]"),
        (["ngram", "doc", "--index", idx, "99"], "DOC_IX: expected an integer in [0, 4)"),
        (["retrieve", "--index", tmp_path / "none", "--k", "0", "who?"], "--k 0: expected a positive number of neighbours"),
        (["neighbours", "--index", tmp_path / "none", "--out", tmp_path / "n.npy", "--k", "-1"],
         "--k -1: expected a positive number of neighbours"),
        (["demo", "--out", tmp_path / "demo", "--retriever-port", "70000"],
         "--retriever-port 70000: expected a port number in [0, 65535]"),
    ]:
        code, out, err = _cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
        assert err.split(": error: ", 1)[1].startswith(("--", "TEXT", "DOC_IX")), err   # what the user typed
    # --top K shows K rows, no fewer
    code, out, _ = _cli(capsys, "ngram", "ntd", "--index", idx, "my", "--top", "3")
    assert code == 0 and len(out.splitlines()) == 1 + 2 + 3   # the counts, the two forms, three tokens
    # the same names through a server (the server's INVALID_ARGUMENT, its argument named as the user typed it)
    from retrogram.services.launch import ThreadServer
    from retrogram.services.ngram_service import NgramServicer

    with ThreadServer([NgramServicer(ngram_index)]).load() as server:
        code, out, err = _cli(capsys, "ngram", "count", "--server", server.address, "--ids", "49152")
        assert code == 2 and "--ids: token id 49152 is outside the vocabulary" in err and "INVALID_ARGUMENT" in err


def test_ngram_doc_json_metadata_is_an_object(ngram_index, small_corpus, capsys):
    record = json.loads(small_corpus.read_text().splitlines()[1])
    code, out, _ = _cli(capsys, "ngram", "doc", "--index", ngram_index, "1", "--json", "--max-disp-len", "5")
    d = json.loads(out)
    assert code == 0 and isinstance(d["metadata"], dict)
    assert d["metadata"]["external_id"] == record["id"] and d["metadata"]["metadata"] == {"collection": record["collection"]}
    code, out, _ = _cli(capsys, "ngram", "doc", "--index", ngram_index, "1", "--max-disp-len", "5")
    assert json.loads(out.splitlines()[1]) == d["metadata"]


# ------------------------------------------------------------------------------- serve: a port in use

def _retrogram(*argv, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    from retrogram.services.launch import retrogram_command

    return subprocess.run(retrogram_command(*map(str, argv)), capture_output=True, text=True, timeout=timeout, **kw)


def _servers_of(index) -> list[str]:
    """Command lines of running processes that serve this index (the children a command started)."""
    found = []
    for p in os.listdir("/proc"):
        try:
            argv = open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "serve" in argv and str(index) in argv:
            found.append(" ".join(argv))
    return found


@pytest.fixture
def busy_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "add_port" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    return errors[0]


def test_serve_port_in_use_is_one_line_and_exit_2(ngram_index, busy_port):
    line = _one_error_line(_retrogram("serve", "ngram", "--index", ngram_index, "--port", busy_port))
    assert f"--port {busy_port}: 127.0.0.1:{busy_port} is already in use" in line
    line = _one_error_line(_retrogram("serve", "--index", ngram_index, "--ngram-port", busy_port))
    assert f"--ngram-port {busy_port}: 127.0.0.1:{busy_port} is already in use" in line
    # a child of the stack that fails after it started (its metrics port taken): the stack says which service
    # and why, once (the child leaves its own error line to the stack), and leaves nothing running
    line = _one_error_line(_retrogram("serve", "--index", ngram_index, "--ngram-port", 0, "--metrics-port", busy_port))
    assert f"ngram service: --metrics-port {busy_port}: cannot serve metrics on 127.0.0.1:{busy_port}" in line
    assert _servers_of(ngram_index) == []
    line = _one_error_line(_retrogram("serve", "ngram", "--index", ngram_index, "--port", 70000))
    assert "--port 70000: expected a port number in [0, 65535]" in line


# ------------------------------------------------------------------------------- hints and damaged indexes

PLAYS = [{"id": f"p{i}", "text": text} for i, text in enumerate([
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\nThe slings and arrows "
    "of outrageous fortune,\nOr to take arms against a sea of troubles\nAnd by opposing end them.",
    "The quality of mercy is not strain'd;\nIt droppeth as the gentle rain from heaven\nUpon the place beneath. "
    "It is twice blest;\nIt blesseth him that gives and him that takes.",
    "Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him.\nThe evil that men "
    "do lives after them;\nThe good is oft interred with their bones."])]


def _hint(err: str) -> list[str]:
    """The command an error line tells the user to run, as argv for the CLI (without `retrogram`)."""
    import re
    import shlex

    m = re.search(r"`retrogram ([^`]+)`", err)
    assert m, err
    return shlex.split(m.group(1))


def test_missing_stage_hint_works_as_printed(tmp_path, capsys, monkeypatch):
    """`build-index --out IDX --stages S`, as a missing stage's error prints it, builds S from the corpus and
    with the tokenizer the index records (it wanted --corpus, then failed on the default tokenizer)."""
    from conftest import write_jsonl
    from retrogram.index.manifest import Manifest

    corpus = write_jsonl(tmp_path / "plays.jsonl", PLAYS)
    monkeypatch.chdir(tmp_path)   # the hint names the index as the user did: a relative path
    code, _, err = _cli(capsys, "build-index", "--corpus", corpus, "--out", "idx", "--tokenizer", "bytes",
                        "--stages", "tokenize", "--no-progress")
    assert code == 0, err
    recorded = Manifest.load(tmp_path / "idx")
    for argv, stage in [(["retrieve", "--index", "idx", "--k", "1", "Who is Caesar?"], "faiss"),
                        (["ngram", "count", "--index", "idx", "not to be"], "ngram")]:
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and f"no '{stage}' stage" in err, err
        hint = _hint(err)
        assert hint == ["build-index", "--out", "idx", "--stages", stage]
        code, _, err = _cli(capsys, *hint)
        assert code == 0, err
        code, out, err = _cli(capsys, *argv)
        assert code == 0 and out.strip(), err
    m = Manifest.load(tmp_path / "idx")
    assert m.tokenizer == recorded.tokenizer and m.corpus == recorded.corpus and m.token_width == 1
    assert set(m.stages) == {"tokenize", "ngram", "chunks", "embeddings", "faiss"}
    code, out, _ = _cli(capsys, "retrieve", "--index", "idx", "--k", "1", "--json", "Who is Caesar?")
    assert json.loads(out)[0]["neighbours"][0]["document"]["external_id"] == "p2"
    code, _, err = _cli(capsys, "retrieve", "--index", "idx", "--k", "1000", "Who is Caesar?")
    chunks = m.stages["chunks"].counts["chunks"]
    assert code == 2 and f"--k 1000: larger than the index ({chunks} chunks)" in err
    # a directory without an index still needs --corpus
    code, _, err = _cli(capsys, "build-index", "--out", "other", "--tokenizer", "bytes")
    assert code == 2 and "--corpus: required (--out other holds no index" in err


@pytest.fixture(scope="module")
def bytes_index(tmp_path_factory):
    """PLAYS through every stage, with the bytes tokenizer."""
    from conftest import write_jsonl
    from retrogram.services.cli import main

    d = tmp_path_factory.mktemp("plays")
    corpus = write_jsonl(d / "plays.jsonl", PLAYS)
    assert main(["build-index", "--corpus", str(corpus), "--out", str(d / "idx"), "--tokenizer", "bytes",
                 "--no-progress"]) == 0
    return d / "idx"


def test_damaged_index_is_one_line_for_info_and_retrieve(bytes_index, tmp_path, capsys):
    """A truncated, emptied or foreign store.sqlite, and a truncated n-gram table: `info` (which checks what it
    reports) and `retrieve` say which file and what is wrong in one line, exit 2, no sqlite3 traceback; the
    store's rebuild hint works as printed."""
    import sqlite3

    def damaged(how):
        idx = tmp_path / "idx"
        shutil.rmtree(idx, ignore_errors=True)
        shutil.copytree(bytes_index, idx)
        how(idx)
        return idx

    def one_line(argv, *words):
        code, out, err = _cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), (argv, err)
        return err

    def truncate(path, size):
        with open(path, "r+b") as f:
            f.truncate(size)

    store = lambda idx: idx / "store.sqlite"   # noqa: E731
    cases = [
        (lambda idx: truncate(store(idx), store(idx).stat().st_size // 2), ["store.sqlite: truncated"]),
        (lambda idx: truncate(store(idx), 0), ["store.sqlite: empty (0 bytes)"]),
        (lambda idx: store(idx).write_bytes(b"not a database" * 100), ["store.sqlite: not an SQLite database"]),
    ]
    for how, words in cases:
        idx = damaged(how)
        one_line(["info", idx], *words)
        err = one_line(["retrieve", "--index", idx, "Who is Caesar?"], *words)
        code, _, err = _cli(capsys, *_hint(err), "--no-progress")   # rebuild it as the error says
        assert code == 0, err
        code, out, _ = _cli(capsys, "info", idx, "--json")
        assert code == 0 and json.loads(out)["documents"] == len(PLAYS)
    # rows deleted behind the manifest's back
    idx = damaged(lambda idx: sqlite3.connect(store(idx)).execute("DELETE FROM documents WHERE id = 1").connection.commit())
    one_line(["info", idx], "table documents has 2 rows, the manifest says 3")
    # the n-gram suffix array truncated: queries caught it, info said nothing
    idx = damaged(lambda idx: truncate(idx / "ngram" / "table.0", (idx / "ngram" / "table.0").stat().st_size - 3))
    one_line(["info", idx], "table.0: truncated")
    one_line(["info", idx, "--json"], "table.0: truncated")


# ------------------------------------------------------------------------------- results on stdout

def test_results_go_to_stdout_progress_and_logs_to_stderr(bytes_index, tmp_path, capsys):
    """`retrogram info IDX 2>/dev/null` printed nothing: info, retrieve, build-index (and neighbours, --append)
    wrote their results to stderr."""
    from conftest import write_jsonl

    for argv, words in [
        (["info", bytes_index], ["documents: 3", "tokenizer: bytes", "faiss"]),
        (["retrieve", "--index", bytes_index, "--k", "1", "Who is Caesar?"], ["query: Who is Caesar?", "score", "(p2)"]),
        (["build-index", "--out", bytes_index, "--no-progress"], ["index ready", "faiss", "skipped (up to date)"]),
        (["neighbours", "--index", bytes_index, "--out", tmp_path / "n.npy", "--k", "1", "--no-progress"],
         ["neighbours of", "(k=1)"]),
    ]:
        code, out, err = _cli(capsys, *argv)
        assert code == 0 and err == "" and all(w in out for w in words), (argv, out, err)
    idx = tmp_path / "idx"
    shutil.copytree(bytes_index, idx)
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": "q", "text": "Now is the winter of our discontent\n" * 3}])
    code, out, err = _cli(capsys, "build-index", "--out", idx, "--corpus", more, "--append", "--no-progress")
    assert code == 0 and err == "" and "appended 1 documents" in out, (out, err)


# ------------------------------------------------------------------------------- the demo

def test_demo_reports_on_stdout_logs_stages_and_stops_every_server_it_started(small_corpus, tmp_path, busy_port, capsys):
    """Without a terminal the demo logs each step on stderr, prints its results (the ∞-gram scores too),
    timings and what to try next on stdout, with no Python reprs; a server that cannot start is named with
    its reason in one line, and no server the demo started is left running."""
    import re
    import shlex

    from retrogram.ngram import Engine
    from retrogram.services.cli_demo import PHRASES, SCORED

    idx = tmp_path / "demo-index"
    r = _retrogram("demo", "--corpus", small_corpus, "--out", idx, timeout=900)
    assert r.returncode == 0, r.stderr
    for stage in ("tokenize", "ngram", "chunks", "embeddings", "faiss"):
        assert f"stage {stage}: started" in r.stderr and f"stage {stage}: done in" in r.stderr, r.stderr
    assert "ngram server: serving on 127.0.0.1:" in r.stderr and "retriever server: stopped" in r.stderr
    assert "decoder server: stopped" in r.stderr
    out = r.stdout
    assert not re.search(r"\[\(|\['|\('|\[\d+, \d+", out), out   # no list or tuple reprs
    e = Engine(idx)
    for phrase in PHRASES:
        assert re.search(rf"^ +{e.count_text(phrase)['count']:,}  {re.escape(phrase)}$", out, re.M), out
    scores = out.split("∞-gram probability")[1].split("\n\n")[0].splitlines()[1:]
    scored = e.score_text(SCORED)
    assert len(scores) == len(scored["prob"]) == len(e.tokenize(SCORED))
    for line, p, n in zip(scores, scored["prob"], scored["suffix_len"]):
        assert line.split()[0] == f"{p:.3f}" and line.endswith(f"suffix of {n} token" + ("" if n == 1 else "s"))
    assert "its answers match the in-process ones" in out
    assert re.search(r"^answer to .*\n  \S.*\n  \d+ tokens, first after \d+ ms", out, re.M), out
    assert re.search(r"^timings: build [\d.]+ s, n-gram queries [\d.]+ s, retrieval [\d.]+ s, gRPC stack [\d.]+ s; "
                     r"total [\d.]+ s$", out, re.M), out
    tries = [line.strip() for line in out.split("try next:")[1].strip().splitlines()]
    assert len(tries) >= 4
    for cmd in tries:   # each works as printed (but serve, which runs until stopped)
        argv = shlex.split(cmd)
        assert argv[0] == "retrogram"
        if argv[1] != "serve":
            code, printed, err = _cli(capsys, *argv[1:])
            assert code == 0 and printed.strip(), (cmd, err)
    # a server that cannot start: its port taken (the other server was started beside it)
    for failing in ("retriever", "ngram", "decoder"):
        r = _retrogram("demo", "--corpus", small_corpus, "--out", idx, f"--{failing}-port", busy_port, timeout=900)
        line = _one_error_line(r)
        assert (f"retrogram demo: error: {failing} server did not start: --{failing}-port {busy_port}: "
                f"127.0.0.1:{busy_port} is already in use") in line
        assert r.stdout == ""
        assert _servers_of(idx) == []


# ------------------------------------------------------------------------------- the docs stand alone

REPO = Path(__file__).resolve().parents[2]


def test_docs_stand_alone():
    """README links the design notes in the repository (it pointed at ../shared/DESIGN.md, which no clone
    has); every relative link of README and docs/design.md resolves; the Using section shows `retrogram
    health` and `build-index --append`, and both say how text queries are tokenized."""
    import re

    readme, design = (REPO / "README.md").read_text(), (REPO / "docs" / "design.md").read_text()
    assert "../shared" not in readme and "(docs/design.md)" in readme
    for doc, text in ((REPO / "README.md", readme), (REPO / "docs" / "design.md", design)):
        for target in re.findall(r"\]\(([^)#:]+)\)", text):
            assert (doc.parent / target).exists(), (doc, target)
    using = readme.split("## Using it")[1].split("\n## ")[0]
    assert "retrogram health " in using and "--append" in using and "--exact" in using
    for text in (" ".join(using.split()), " ".join(design.split())):
        assert "after a space" in text and "start of a line" in text and "--exact" in text


def test_readme_query_examples_hold_on_the_demo_corpus(tmp_path_factory, demo_corpus, capsys):
    """The numbers README's Using section gives for the demo index."""
    from retrogram.ngram import Engine

    idx = tmp_path_factory.mktemp("demo") / "idx"
    code, _, err = _cli(capsys, "build-index", "--corpus", demo_corpus, "--out", idx, "--stages", "tokenize,ngram",
                        "--no-progress")
    assert code == 0, err
    e = Engine(idx)
    assert e.tokenize(" king") == [4197] and e.tokenize("king") == [644]
    words = e.count_text("king")
    assert (words["count"], [f["count"] for f in words["forms"]]) == (198, [193, 5])
    assert e.count(e.tokenize("king"))["count"] == 25
    assert e.count_text("To be, or not to be")["count"] >= 1 and e.count_text("to be or not to be")["count"] == 0
    code, out, _ = _cli(capsys, "ngram", "count", "--index", idx, "--cnf", "king AND queen OR prince")
    assert code == 0 and int(out.splitlines()[0]) > 0
