"""The DecoderService over real gRPC on loopback, with a tiny random llama of SmolLM2's tokenizer (tiny_lm_dir)
and a real n-gram index: Generate's tokens equal the in-process Decoder's (greedy, seeded, concurrent streams),
a cancelled or expired stream stops decoding and gives its pages back, a full queue is RESOURCE_EXHAUSTED,
every bad input is INVALID_ARGUMENT naming the field and the server answers the next call, Score equals the
in-process scores, Load / Info / health, the CLI's --server, and `retrogram serve` with the decoder in the
stack (draining a stream in flight on Ctrl-C)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from retrogram.protos import decoder_pb2 as dpb
from retrogram.protos import decoder_pb2_grpc as dgrpc
from retrogram.retro.decoder import Decoder, DecoderOptions
from retrogram.retro.sampling import SamplingParams
from retrogram.services.client import AsyncDecoderClient, DecoderClient, ServiceError
from retrogram.services.decoder_service import DecoderServicer
from retrogram.services.launch import ThreadServer, retrogram_command

pytestmark = pytest.mark.timeout(300)

PROMPT = "To be, or not to be, that is the question"
CORPUS_PHRASE = "Thou art"   # occurs in the small corpus: the ∞-gram side has something to say


@pytest.fixture(scope="module")
def ngram_index(tmp_path_factory, small_corpus) -> Path:
    from conftest import build_ngram_index

    return build_ngram_index(tmp_path_factory.mktemp("dec") / "idx", small_corpus)


@pytest.fixture(scope="module")
def opts(tiny_lm_dir, ngram_index) -> DecoderOptions:
    return DecoderOptions(model=str(tiny_lm_dir), index=str(ngram_index))


@pytest.fixture(scope="module")
def server(opts):
    svc = DecoderServicer(opts)
    with ThreadServer([svc]).load() as srv:
        srv.svc = svc
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with DecoderClient(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def ref(opts) -> Decoder:
    """The in-process decoder on the same model and index: the reference."""
    return Decoder.load(DecoderOptions(model=opts.model, index=opts.index, max_running=1))


def ref_generate(ref: Decoder, prompt, params: SamplingParams, chat: bool = False) -> tuple[list[int], list]:
    ids = ref.prompt(ids=prompt) if not isinstance(prompt, str) else ref.prompt(text=prompt, chat=chat)
    return ids, list(ref.generate(ids, SamplingParams(**vars(params))))


def tokens(events) -> list[int]:
    return [t for e in events for t in e["token_ids"]]


def wait_for(predicate, what: str, limit_s: float = 30.0):
    end = time.monotonic() + limit_s
    while not (v := predicate()):
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {limit_s} s")
        time.sleep(0.01)
    return v


def idle(c: DecoderClient) -> dict | None:
    """The Load report once nothing runs or waits and every page is free (else None)."""
    r = c.load()
    ok = r["running"] == 0 and r["waiting"] == 0 and r["kv_pages_free"] == r["kv_pages_total"]
    return r if ok else None


# ------------------------------------------------------------------------------------------ generation

CASES = [
    SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=0.75, top_k=50, top_p=0.875, seed=7, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=0.5, repetition_penalty=1.25, seed=3, max_tokens=8),
    SamplingParams(temperature=0, max_tokens=8, ngram_lambda=0.5, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=8, ngram_lambda_by_length=((1, 0.25), (3, 0.75)), ignore_eos=True),
]


@pytest.mark.parametrize("params", CASES, ids=["greedy", "seeded", "penalty", "ngram", "ngram_by_length"])
def test_generate_equals_the_in_process_decoder(client, ref, params):
    text = CORPUS_PHRASE if params.ngram_lambda or params.ngram_lambda_by_length else PROMPT
    ids, want = ref_generate(ref, text, params)
    got = list(client.generate(text, params, logprobs=True))
    assert got[0]["prompt_ids"] == ids and all("prompt_ids" not in e for e in got[1:])
    assert tokens(got) == [t for e in want for t in e.token_ids]
    assert "".join(e["text"] for e in got) == "".join(e.text for e in want)
    assert [e["finish_reason"] for e in got[:-1]] == [None] * (len(got) - 1)
    assert got[-1]["finish_reason"] == want[-1].finish_reason
    lps = [x for e in got for x in e["logprobs"]]
    assert lps == pytest.approx([x for e in want for x in e.logprobs], rel=1e-4, abs=1e-4)
    usage = got[-1]["usage"]
    assert usage["prompt_tokens"] == len(ids) and usage["completion_tokens"] == len(tokens(got))
    assert 0 < usage["time_to_first_token_s"] <= usage["total_s"]
    assert all(e["usage"] is None for e in got[:-1])


def test_chat_prompt_and_server_default_max_tokens(client, ref):
    ids, want = ref_generate(ref, "Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), chat=True)
    got = list(client.generate("Hello", {"temperature": 0, "max_tokens": 6, "ignore_eos": True}, chat=True))
    assert got[0]["prompt_ids"] == ids and tokens(got) == [t for e in want for t in e.token_ids]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    got = list(client.generate(msgs, {"temperature": 0, "max_tokens": 2}))
    from retrogram.retro.detokenize import apply_chat_template

    assert got[0]["prompt_ids"] == apply_chat_template(ref.tokenizer, msgs)
    # max_tokens 0: the server's default, bounded by what the context leaves after the prompt
    long = [int(t) for t in ref.tokenizer.encode(PROMPT)] * 100
    long = long[:ref.max_context - 5]
    got = list(client.generate(long, {"temperature": 0, "ignore_eos": True}))
    assert len(tokens(got)) == 5 and got[-1]["finish_reason"] == "length"


def test_eight_concurrent_streams_get_their_own_tokens(server, ref):
    words = ["Thou", "The king", "My lord", "O Romeo", "To be", "What light", "Friends", "Now is"]
    params = [SamplingParams(temperature=0 if i % 2 else 0.75, seed=i, max_tokens=6 + i, ignore_eos=True)
              for i in range(8)]
    want = [ref_generate(ref, w, p) for w, p in zip(words, params)]

    async def main():
        async with AsyncDecoderClient(server.address) as c:
            async def one(w, p):
                return [e async for e in c.generate(w, p)]

            return await asyncio.gather(*(one(w, p) for w, p in zip(words, params)))

    got = asyncio.run(main())
    for (ids, evs), g, p in zip(want, got, params):
        assert g[0]["prompt_ids"] == ids
        assert tokens(g) == [t for e in evs for t in e.token_ids] and len(tokens(g)) == p.max_tokens


def test_cancel_stops_decoding_and_gives_the_pages_back(server, client):
    sched = server.svc.decoder.scheduler
    before = sched.steps
    it = client.generate(PROMPT, {"temperature": 0, "max_tokens": 1000, "ignore_eos": True})
    first = [next(it), next(it)]
    assert first[0]["prompt_ids"] and all(len(e["token_ids"]) >= 1 for e in first)
    it.close()                                   # cancels the call
    r = wait_for(lambda: idle(client), "pages back and nothing running after a cancel")
    assert r["kv_pages_free"] == r["kv_pages_total"] > 0
    # decoding stopped: nowhere near the 1000 steps the whole generation takes
    assert sched.steps - before < 500, sched.steps - before


def test_deadline_exceeded_stops_decoding(server, client):
    sched = server.svc.decoder.scheduler
    before = sched.steps
    with pytest.raises(ServiceError) as e:
        list(client.generate(PROMPT, {"temperature": 0, "max_tokens": 1000, "ignore_eos": True}, timeout=0.05))
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: idle(client), "pages back after a deadline")
    assert sched.steps - before < 999, sched.steps - before
    assert tokens(client.generate("Thou", {"temperature": 0, "max_tokens": 2, "ignore_eos": True})) != []


# ----------------------------------------------------------------------------------------- bad input

def _bad_generate(client, prompt, params=None, **kw):
    with pytest.raises(ServiceError) as e:
        list(client.generate(prompt, params, **kw))
    return e.value


BAD_GENERATE = [
    ("", {}, "prompt: empty"),
    ([], {}, "prompt: no text and no token ids"),
    ([400] * 1100, {"max_tokens": 4}, "prompt: 1100 tokens, the context holds 1024"),
    ([60000], {}, "prompt: token id 60000 outside the model's vocabulary"),
    (PROMPT, {"max_tokens": 2000}, "max_tokens: 2000"),
    (PROMPT, {"temperature": -1}, "temperature: expected a number >= 0"),
    (PROMPT, {"top_p": 0.0}, "top_p: expected a number in (0, 1]"),
    (PROMPT, {"top_p": 1.5}, "top_p: expected a number in (0, 1]"),
    (PROMPT, {"repetition_penalty": 0.0}, "repetition_penalty: expected a number > 0"),
    (PROMPT, {"ngram_lambda": 1.5}, "ngram_lambda: expected a number in [0, 1]"),
    (PROMPT, {"ngram_lambda_by_length": ((3, 0.5), (1, 0.5))}, "ngram_lambda_by_length: expected"),
    ([{"role": "user", "content": ""}], {}, "chat.messages[0].content: empty"),
]


def test_bad_inputs_are_invalid_argument_naming_the_field_and_the_server_goes_on(server, client, ref):
    for prompt, params, words in BAD_GENERATE:
        err = _bad_generate(client, prompt, params)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and words in err.details, (prompt, params, str(err))
    # a request with no prompt, and a chat without messages, straight through the stub
    with grpc.insecure_channel(server.address) as ch:
        stub = dgrpc.DecoderServiceStub(ch)
        for req, words in ((dpb.GenerateRequest(), "prompt: expected text_or_ids"),
                           (dpb.GenerateRequest(chat=dpb.ChatPrompt()), "chat.messages: expected at least one")):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(req, timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()
    for call, words in ((lambda: client.score(""), "text_or_ids: empty"),
                        (lambda: client.score([5]), "at least two"),
                        (lambda: client.score(PROMPT, ngram_lambda=2.0), "ngram_lambda: expected a number in [0, 1]")):
        with pytest.raises(ServiceError) as e:
            call()
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details, str(e.value)
    # a prompt too long is kept to its last tokens when asked, leaving room for max_tokens
    long = [int(t) for t in ref.tokenizer.encode(PROMPT)] * 100
    got = list(client.generate(long, {"temperature": 0, "max_tokens": 4, "ignore_eos": True}, truncate=True))
    assert got[0]["prompt_ids"] == long[-(ref.max_context - 4):] and len(tokens(got)) == 4
    # and the server answers the next good call as before
    ids, want = ref_generate(ref, PROMPT, CASES[0])
    assert tokens(client.generate(PROMPT, CASES[0])) == [t for e in want for t in e.token_ids]
    assert idle(client)


# -------------------------------------------------------------------------------- score, load, info

@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_score_equals_the_in_process_scores(client, ref, lam):
    text = "Thou art more lovely and more temperate"
    got = client.score(text, ngram_lambda=lam)
    ids = [int(t) for t in ref.tokenizer.encode(text)]
    want = ref.score(ids, lam)
    assert got["token_ids"] == ids
    assert got["logprobs"] == pytest.approx(want.lm_logprobs.tolist(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(want.lm_perplexity, rel=1e-9)
    if lam:
        assert got["mixed_logprobs"] == pytest.approx(want.logprobs.tolist(), rel=1e-5)
        assert got["mixed_perplexity"] == pytest.approx(want.perplexity, rel=1e-9)
        assert got["mixed_perplexity"] < got["perplexity"]   # the corpus knows English; the random model does not
    else:
        assert "mixed_logprobs" not in got
    assert client.score(ids, ngram_lambda=lam)["logprobs"] == got["logprobs"]   # ids as well as text


def test_load_and_info(client, ref, ngram_index):
    info = client.info()
    want = ref.info()
    for k in ("model", "tokenizer_sha256", "vocab_size", "max_context", "device", "dtype", "page_size", "eos_token_id"):
        assert info[k] == want[k], k
    assert info["index_dir"] == str(ngram_index) and info["kv_pages"] > 0 and info["server_version"]
    r = wait_for(lambda: idle(client), "an idle server")
    assert (r["max_running"], r["max_waiting"]) == (64, 256)
    list(client.generate(PROMPT, {"temperature": 0, "max_tokens": 3, "ignore_eos": True}))
    assert wait_for(lambda: client.load()["tokens_per_s"] > 0, "a token rate after generating")


def test_health_queue_full_and_no_index(tiny_lm_dir):
    """A second server (no index, one request at a time, one waiting, an API key): NOT_SERVING until loaded,
    a full queue is RESOURCE_EXHAUSTED, ngram_lambda needs an index, a call without the key is refused."""
    from retrogram.services.cli_serve import check_health
    from retrogram.services.serving import ServeConfig

    svc = DecoderServicer(DecoderOptions(model=str(tiny_lm_dir), max_running=1, max_waiting=1))
    with ThreadServer([svc], ServeConfig(api_keys=("k1",))) as srv, \
            DecoderClient(srv.address, retries=False, api_key="k1") as c:
        assert check_health(srv.address, "retrogram.v1.DecoderService") == "NOT_SERVING"
        with pytest.raises(ServiceError) as e:
            list(c.generate(PROMPT, {"max_tokens": 2}))
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "still loading" in e.value.details
        srv.load()
        assert check_health(srv.address, "retrogram.v1.DecoderService") == "SERVING"
        assert check_health(srv.address) == "SERVING"
        with DecoderClient(srv.address) as keyless, pytest.raises(ServiceError) as e:
            list(keyless.generate(PROMPT, {"max_tokens": 2}))
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED

        err = _bad_generate(c, PROMPT, {"ngram_lambda": 0.5})
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "ngram_lambda: this decoder has no n-gram index" in err.details
        with pytest.raises(ServiceError, match="ngram_lambda") as e:
            c.score(PROMPT, ngram_lambda=0.5)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT

        running = c.generate(PROMPT, {"temperature": 0, "max_tokens": 1000, "ignore_eos": True})
        next(running)                                   # admitted: it holds the only running slot
        second: list = []
        t = threading.Thread(target=lambda: second.extend(c.generate("Thou", {"temperature": 0, "max_tokens": 3,
                                                                              "ignore_eos": True})))
        t.start()
        wait_for(lambda: c.load()["waiting"] == 1, "the second request waiting")
        with pytest.raises(ServiceError) as e:
            list(c.generate("My lord", {"max_tokens": 2}))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.value.details
        running.close()                                 # its slot goes to the waiting one, which finishes
        t.join(timeout=60)
        assert len(tokens(second)) == 3 and second[-1]["finish_reason"] == "length"
        wait_for(lambda: idle(c), "an idle server")
        assert len(tokens(c.generate("Thou", {"temperature": 0, "max_tokens": 2, "ignore_eos": True}))) == 2


# ----------------------------------------------------------------------------------------------- CLI

def _cli(capsys, *argv) -> tuple[int, str, str]:
    from retrogram.services.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_and_score_through_the_server(capsys, server, tiny_lm_dir, ngram_index):
    flags = ["--max-tokens", 6, "--json", "--ignore-eos", "--raw", PROMPT]
    code, out, err = _cli(capsys, "generate", "--server", server.address, *flags)
    assert code == 0, err
    remote = [json.loads(line) for line in out.splitlines()]
    code, out, err = _cli(capsys, "generate", "--model", tiny_lm_dir, *flags)
    local = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(remote) == len(local)
    for r, lo in zip(remote, local):
        assert {k: v for k, v in r.items() if k not in ("usage", "logprobs")} == \
               {k: v for k, v in lo.items() if k not in ("usage", "logprobs")}
        assert r["logprobs"] == pytest.approx(lo["logprobs"], rel=1e-4, abs=1e-4)
    assert remote[-1]["usage"]["completion_tokens"] == 6
    code, out, err = _cli(capsys, "generate", "--server", server.address, "--max-tokens", 3, "--ignore-eos", "Hello")
    assert code == 0 and out.endswith("\n") and "3 tokens, finish: length" in err

    text = "Thou art more lovely"
    code, out, err = _cli(capsys, "score", "--server", server.address, "--json", "--ngram-lambda", 0.5, text)
    assert code == 0, err
    remote = json.loads(out)
    code, out, err = _cli(capsys, "score", "--model", tiny_lm_dir, "--index", ngram_index, "--json",
                          "--ngram-lambda", 0.5, text)
    local = json.loads(out)
    assert remote["token_ids"] == local["token_ids"]
    for k in ("logprobs", "mixed_logprobs"):
        assert remote[k] == pytest.approx(local[k], rel=1e-5)
    for k in ("perplexity", "mixed_perplexity"):
        assert remote[k] == pytest.approx(local[k], rel=1e-6)
    # a bad flag is refused by the CLI before any call; a refusal by the server is one line, exit 2
    code, out, err = _cli(capsys, "generate", "--server", server.address, "--max-tokens", 5000, "--raw", PROMPT)
    assert code == 2 and "max_tokens: 5000" in err and "INVALID_ARGUMENT" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------- retrogram serve

def test_serve_stack_with_the_decoder_drains_a_stream_on_ctrl_c(ngram_index, tiny_lm_dir, ref):
    """`retrogram serve --index DIR --model M`: the decoder beside the n-gram service (the index has no
    retrieval stages: the retriever is left out, saying why), the ∞-gram mix through the index; on Ctrl-C a
    stream in flight finishes before the stack exits."""
    proc = subprocess.Popen([*retrogram_command(), "serve", "--index", str(ngram_index), "--model", str(tiny_lm_dir),
                             "--ngram-port", "0", "--retriever-port", "0", "--decoder-port", "0", "--grace", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert [(ln["event"], ln["service"]) for ln in lines] == [("serving", "ngram"), ("serving", "decoder")], \
            proc.stderr.read() if proc.poll() is not None else lines
        params = SamplingParams(temperature=0, max_tokens=24, ngram_lambda=0.5, ignore_eos=True)
        ids, want = ref_generate(ref, CORPUS_PHRASE, params)
        with DecoderClient(lines[1]["address"]) as c:
            assert c.info()["index_dir"] == str(ngram_index)
            it = c.generate(CORPUS_PHRASE, params)
            got = [next(it)]
            proc.send_signal(signal.SIGINT)          # the stack stops its servers: the decoder drains
            got += list(it)
        assert tokens(got) == [t for e in want for t in e.token_ids] and got[-1]["finish_reason"] == "length"
        assert proc.wait(timeout=120) == 0
        assert "not serving retriever" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_decoder_refuses_what_it_cannot_serve(capsys, tmp_path, tiny_lm_dir, small_index):
    """Checked before binding, one line naming the flag: a missing model, an index without n-grams, bad sizes."""
    for argv, words in ((["--model", tmp_path / "nope"], "--model"),
                        (["--model", tiny_lm_dir, "--index", small_index], "ngram"),
                        (["--model", tiny_lm_dir, "--max-running", 0], "--max-running 0: expected an integer >= 1"),
                        (["--model", tiny_lm_dir, "--kv-cache-gb", -1], "--kv-cache-gb -1.0: expected a positive")):
        code, out, err = _cli(capsys, "serve", "decoder", "--port", 0, *argv)
        assert code == 2 and words in err and "Traceback" not in err, err
        assert json.loads(out)["event"] == "failed"
    r = subprocess.run([*retrogram_command(), "serve", "decoder", "--port", "0", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no such file or directory" in r.stderr.strip().splitlines()[-1], r.stderr
