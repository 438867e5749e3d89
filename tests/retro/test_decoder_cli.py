"""`retrogram generate` and `retrogram score` on a local model (retro/decoder.py underneath): the tokens and
scores equal the references, and every bad input is one line naming the flag, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from ngram_fixtures import engine_fixture, ngram_index_fixture  # noqa: F401

from retrogram.retro.generate import generate
from retrogram.retro.weights import load_model
from retrogram.services.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_streams_the_greedy_tokens(capsys, tiny_lm_dir):
    code, out, _ = run(capsys, "generate", "--model", tiny_lm_dir, "--raw", "--max-tokens", 6, "--json",
                       "--ignore-eos", "To be, or not to be")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    model, tok = load_model(tiny_lm_dir)
    prompt = tok.encode("To be, or not to be").tolist()
    want = list(generate(model, tok, prompt, 6, stop_token_ids=()))
    assert events[0]["prompt_ids"] == prompt
    assert [t for e in events for t in e["token_ids"]] == want
    assert "".join(e["text"] for e in events) == tok.decode(want)
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 6


def test_generate_chat_template_and_plain_output(capsys, tiny_lm_dir):
    code, out, err = run(capsys, "generate", "--model", tiny_lm_dir, "--max-tokens", 3, "--json", "Hello")
    first = json.loads(out.splitlines()[0])
    from retrogram.retro.detokenize import apply_chat_template

    _, tok = load_model(tiny_lm_dir)
    assert code == 0 and first["prompt_ids"] == apply_chat_template(tok, "Hello")
    code, out, err = run(capsys, "generate", "--model", tiny_lm_dir, "--max-tokens", 3, "--ignore-eos", "Hello")
    assert code == 0 and out.endswith("\n") and "3 tokens, finish: length" in err


def test_score_equals_transformers_loss(capsys, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    text = "The quality of mercy is not strained"
    code, out, _ = run(capsys, "score", "--model", tiny_lm_dir, "--json", text)
    got = json.loads(out)
    hf = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    ids = torch.tensor([got["token_ids"]])
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss
    assert code == 0 and got["perplexity"] == pytest.approx(float(loss.exp()), rel=1e-4)


def test_score_and_generate_with_the_ngram_index(capsys, tiny_lm_dir, ngram_index):
    code, out, _ = run(capsys, "score", "--model", tiny_lm_dir, "--index", ngram_index, "--ngram-lambda", 0.5,
                       "--json", "To be, or not to be")
    got = json.loads(out)
    assert code == 0 and got["mixed_perplexity"] < got["perplexity"]   # the corpus knows the phrase
    code, out, _ = run(capsys, "generate", "--model", tiny_lm_dir, "--index", ngram_index, "--ngram-lambda", 1,
                       "--raw", "--max-tokens", 4, "--json", "To be, or not to")
    assert code == 0 and len(out.splitlines()) >= 1


@pytest.mark.parametrize("argv, words", [
    (["--top-p", "1.5"], "--top-p: expected a number in (0, 1]"),
    (["--max-tokens", "0"], "--max-tokens: expected an integer >= 1"),
    (["--temperature", "-1"], "--temperature: expected a number >= 0"),
    (["--ngram-lambda", "0.5"], "ngram_lambda: this decoder has no n-gram index"),
    (["--ngram-lambda-by-length", "x"], "--ngram-lambda-by-length 'x'"),
    (["--max-tokens", "2000"], "max_tokens: 2000 new tokens"),
])
def test_bad_generate_input_is_one_line(capsys, tiny_lm_dir, argv, words):
    code, out, err = run(capsys, "generate", "--model", tiny_lm_dir, "--raw", *argv, "hello")
    assert code == 2 and out == "" and words in err and len(err.strip().splitlines()) == 1, err


def test_prompt_too_long_and_truncation(capsys, tiny_lm_dir):
    long = "word " * 1100
    code, _, err = run(capsys, "generate", "--model", tiny_lm_dir, "--raw", "--max-tokens", 2, long)
    assert code == 2 and "tokens, the context holds 1024 (shorten it, or ask for truncation)" in err
    code, out, _ = run(capsys, "generate", "--model", tiny_lm_dir, "--raw", "--max-tokens", 2, "--truncate",
                       "--json", long)
    assert code == 0 and len(json.loads(out.splitlines()[0])["prompt_ids"]) == 1022


def test_index_of_another_tokenizer_is_refused(capsys, tiny_lm_dir, tmp_path):
    from retrogram.index.build import run_build
    from retrogram.ngram import pipeline_stages
    from conftest import write_jsonl

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "some bytes to index"}])
    run_build(tmp_path / "idx", [str(corpus)], "bytes", pipeline_stages(), ["tokenize", "ngram"],
              options={"workers": 1})
    code, _, err = run(capsys, "score", "--model", tiny_lm_dir, "--index", tmp_path / "idx", "hello there")
    assert code == 2 and "'bytes'" in err and "tokenizer" in err


def test_a_remote_ngram_server_gives_what_the_local_index_gives(capsys, tiny_lm_dir, ngram_index):
    """--ngram-server: the ∞-gram statistics from a running NgramService (live, through its client)."""
    from retrogram.services.launch import ThreadServer
    from retrogram.services.ngram_service import NgramServicer

    gen = ["generate", "--model", tiny_lm_dir, "--ngram-lambda", 0.7, "--raw", "--max-tokens", 6, "--json",
           "--ignore-eos", "To be, or not to"]
    sc = ["score", "--model", tiny_lm_dir, "--ngram-lambda", 0.4, "--json", "The quality of mercy is not strained"]
    with ThreadServer([NgramServicer(ngram_index)]).load() as server:
        remote = [run(capsys, *argv, "--ngram-server", server.address) for argv in (gen, sc)]
    local = [run(capsys, *argv, "--index", ngram_index) for argv in (gen, sc)]
    assert all(code == 0 for code, _, _ in remote + local), [err for _, _, err in remote + local]
    tokens = [[t for line in out.splitlines() for t in json.loads(line)["token_ids"]] for _, out, _ in (remote[0], local[0])]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 6
    r, lo = json.loads(remote[1][1]), json.loads(local[1][1])
    assert r["mixed_perplexity"] == pytest.approx(lo["mixed_perplexity"], rel=1e-9)
