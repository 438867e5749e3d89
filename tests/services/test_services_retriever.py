"""The retriever gRPC service and the whole stack (`retrogram serve`) over a real index with every stage
(tokenize, ngram, chunks, embeddings with MiniLM, FAISS), real servers on loopback, the real clients."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_full_index

from retrogram.index.retriever import same_neighbours
from retrogram.services.client import (
    AsyncRetrieverClient,
    NgramClient,
    RetrieverClient,
    ServiceError,
)
from retrogram.services.launch import ServerProcess, retrogram_command

pytestmark = pytest.mark.timeout(600)

QUESTION = "who killed the king?"


@pytest.fixture(scope="module")
def full_index(tmp_path_factory, small_corpus):
    return build_full_index(tmp_path_factory, small_corpus)


@pytest.fixture(scope="module")
def retriever(full_index):
    from retrogram.index.retriever import Retriever

    return Retriever.open(full_index)


@pytest.fixture(scope="module")
def server(full_index):
    p = ServerProcess("retriever", full_index).wait_serving(timeout=300)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def client(server):
    with RetrieverClient(server.address) as c:
        yield c


def test_neighbours_equal_the_retriever(client, retriever):
    want = [[n.to_dict() for n in ns] for ns in retriever.search([QUESTION, "my lord"], k=3)]
    assert client.retrieve([QUESTION, "my lord"], k=3) == want      # the same batch: the same numbers
    # alone, the query pads differently: equal as SCORE_ATOL promises, not bit for bit
    assert same_neighbours(client.retrieve(QUESTION, k=3), want[0])
    n = want[0][0]
    assert set(n) >= {"score", "chunk_id", "doc_id", "tokens", "continuation", "text", "continuation_text", "document"}
    # by token ids and by embedding: the same neighbours
    ids = retriever.tokenizer.encode(QUESTION).tolist()
    assert [x["chunk_id"] for x in client.retrieve(("ids", ids), k=3)] == [x["chunk_id"] for x in want[0]]
    emb = retriever.embed([QUESTION])[0]
    got = client.retrieve(emb, k=3)
    assert [x["chunk_id"] for x in got] == [x["chunk_id"] for x in want[0]]
    # tokens only
    lean = client.retrieve(QUESTION, k=1, omit_text=True)[0]
    assert lean["text"] == "" and lean["tokens"] == want[0][0]["tokens"]


def test_a_query_scores_the_same_alone_and_in_any_batch(retriever):
    from retrogram.index.retriever import SCORE_ATOL

    alone = [n.to_dict() for n in retriever.search(QUESTION, k=4)[0]]
    for batch in (["my lord", QUESTION], [QUESTION, "a much longer question about the kings and queens of old"],
                  ["x"] * 7 + [QUESTION]):
        got = retriever.search(batch, k=4)[batch.index(QUESTION)]
        assert same_neighbours([n.to_dict() for n in got], alone)
    # the comparison itself fails where it should
    moved = [{**alone[0], "score": alone[0]["score"] + 2 * SCORE_ATOL}, *alone[1:]]
    assert not same_neighbours(moved, alone)
    assert not same_neighbours(alone[::-1], alone)
    assert not same_neighbours(alone[:-1], alone)


def test_batches_mix_kinds_and_exclude_documents(client, retriever):
    emb = retriever.embed([QUESTION])[0]
    own = client.retrieve(QUESTION, k=1)[0]["doc_id"]
    got = client.retrieve([QUESTION, ("embedding", emb), "my lord"], k=4, exclude_doc=[own, own, None])
    assert len(got) == 3 and all(len(ns) == 4 for ns in got)
    assert all(n["doc_id"] != own for n in got[0] + got[1])
    want = [[n.to_dict() for n in ns] for ns in retriever.search([QUESTION, "my lord"], k=4, exclude_doc=[own, None])]
    assert same_neighbours(got[0], want[0]) and same_neighbours(got[2], want[1])
    every = client.retrieve(QUESTION, k=5, exclude_docs=[0, 1])
    assert all(n["doc_id"] not in (0, 1) for n in every)


@pytest.mark.parametrize("call, code, words", [
    (lambda c: c.retrieve("", k=2), "INVALID_ARGUMENT", "empty"),
    (lambda c: c.retrieve([], k=2), "INVALID_ARGUMENT", "at least one"),
    (lambda c: c.retrieve(QUESTION, k=10**6), "RESOURCE_EXHAUSTED", "k 1,000,000"),
    (lambda c: c.retrieve(QUESTION, k=999), "INVALID_ARGUMENT", "k"),
    (lambda c: c.retrieve(("embedding", [0.1] * 7)), "INVALID_ARGUMENT", "384"),
    (lambda c: c.retrieve(("embedding", [float("nan")] * 384)), "INVALID_ARGUMENT", "NaN"),
    (lambda c: c.retrieve(("ids", [10**8])), "INVALID_ARGUMENT", "ids"),
    (lambda c: c.retrieve(QUESTION, exclude_docs=[999]), "INVALID_ARGUMENT", "999"),
])
def test_errors(client, call, code, words):
    with pytest.raises(ServiceError) as e:
        call(client)
    assert e.value.code.name == code, str(e.value)
    assert words in str(e.value)


def test_async_client_and_info(server, retriever):
    async def main():
        async with AsyncRetrieverClient(server.address) as c:
            a, b = await asyncio.gather(c.retrieve(QUESTION, k=2), c.retrieve(["my lord", QUESTION], k=2))
            assert same_neighbours(a, b[1])
            info = (await c.info())[0]
            assert int(info["num_chunks"]) == retriever.n_chunks and info["embedding_dim"] == retriever.dim

    asyncio.run(main())


def test_retriever_server_started_as_a_user_types_it_from_the_repository_root(full_index):
    """`python -m retrogram.services.cli serve retriever` with the root first on sys.path and Hugging Face's
    `kernels` installed (which transformers imports while loading MiniLM): the folder kernels/ must not
    shadow it."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "retrogram.services.cli", "serve", "retriever", "--index",
                             str(full_index), "--port", "0"], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        events = []
        for line in proc.stdout:
            events.append(json.loads(line)["event"])
            if events[-1] in ("serving", "failed"):
                break
        assert events[-1:] == ["serving"], proc.stderr.read() if proc.poll() is not None else events
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_serve_stack(full_index, retriever):
    """`retrogram serve --index DIR`: both services in their own processes on the printed loopback ports,
    queried over gRPC; Ctrl-C stops them all."""
    from conftest import free_port as _free_port

    p1, p2 = _free_port(), _free_port()
    proc = subprocess.Popen([*retrogram_command(), "serve", "--index", str(full_index), "--no-decoder",
                             "--ngram-port", str(p1), "--retriever-port", str(p2)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert lines == [{"event": "serving", "service": "ngram", "address": f"127.0.0.1:{p1}"},
                         {"event": "serving", "service": "retriever", "address": f"127.0.0.1:{p2}"}]
        with NgramClient(lines[0]["address"]) as c:
            assert c.count(" the")["count"] > 0
        with RetrieverClient(lines[1]["address"]) as c:
            assert c.retrieve(QUESTION, k=1)[0]["chunk_id"] == retriever.search(QUESTION, k=1)[0][0].chunk_id
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the children are gone too
    from retrogram.services.cli_serve import check_health

    assert check_health(f"127.0.0.1:{p1}", timeout=2) == "UNREACHABLE"
    assert check_health(f"127.0.0.1:{p2}", timeout=2) == "UNREACHABLE"


def test_stack_on_an_index_without_retrieval(tmp_path, full_index):
    """An index with only the n-gram stages: the stack serves what it can and says why not the rest."""
    from retrogram.services.cli_serve import stack_services

    names, why = stack_services(full_index)
    assert names == ["ngram", "retriever", "decoder"] and not why
    import shutil

    part = tmp_path / "idx"
    shutil.copytree(full_index, part)
    m = json.loads((part / "manifest.json").read_text())
    for st in ("chunks", "embeddings", "faiss"):
        m["stages"].pop(st)
    (part / "manifest.json").write_text(json.dumps(m))
    names, why = stack_services(part)
    assert names == ["ngram", "decoder"] and "faiss" in why["retriever"]


def test_cli_retrieve_server_flag(server, full_index):
    def cli(*argv):
        return subprocess.run([*retrogram_command(), "retrieve", *map(str, argv)],
                              capture_output=True, text=True, timeout=300)

    local = cli("--index", full_index, "--json", "--k", "2", QUESTION, "my lord")
    remote = cli("--server", server.address, "--json", "--k", "2", QUESTION, "my lord")
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    bad = cli("--server", server.address, "--k", "0", QUESTION)
    assert bad.returncode == 2 and "k 0" in bad.stderr
    bad = cli("--server", server.address, "--k", "5000", QUESTION)   # the CLI asks the server's chunk count first
    assert bad.returncode == 2 and "--k 5000" in bad.stderr and "chunks" in bad.stderr
