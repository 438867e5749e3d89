"""Issue 14's "first hour" of a new user: what the CLI and the Python API print, where, and what they count.

Real indexes built through the pipeline, the real CLI (in process, or as `retrogram` in a child process
where exit codes, streams or servers matter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    from retrogram.index.build import run_build
    from retrogram.services.stages import pipeline_stages

    out = tmp_path_factory.mktemp("newcomer") / "idx"
    run_build(out, [str(small_corpus)], None, pipeline_stages(), ["tokenize", "ngram"], options={"workers": 1})
    return out


def _brute_count(docs: list[list[int]], seq: list[int]) -> int:
    """Occurrences of a token sequence in the documents, by looking at every position."""
    n = len(seq)
    return sum(d[i:i + n] == seq for d in docs for i in range(len(d) - n + 1))


@pytest.fixture(scope="module")
def docs(ngram_index) -> list[list[int]]:
    from retrogram.index.stages.tokenize import TokenStream

    stream = TokenStream.open(ngram_index)
    return [stream.doc(i).tolist() for i in range(stream.n_docs)]


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
    # a CNF: find_cnf lists a location once per pairing of its clauses; each is drawn once
    cnf = [[e.tokenize(" my")], [e.tokenize(" good")]]
    ptrs = e.find_cnf(cnf)["ptrs_by_shard"][0]
    assert len(set(ptrs)) < len(ptrs), "find_cnf lists one location once per pairing: the test needs such a case"
    r = e.search_docs_cnf(cnf, maxnum=10_000, max_disp_len=9)
    assert r["cnt"] == len(ptrs) and len(set(r["idxs"])) == len(r["documents"]) == len(set(ptrs))
    assert all(_is_match(d, [t for clause in cnf for t in clause]) for d in r["documents"])
