"""`retrogram demo`: the whole job on the embedded defaults. Builds an index over the shipped demo corpus
(Shakespeare), queries n-gram statistics, retrieves neighbours, then starts the gRPC stack (n-gram, retriever,
decoder), asks it the same questions over real sockets, and ends by generating an answer to the question
through the DecoderService: SmolLM2-135M-Instruct, prompted with the retrieved chunk, its next-token
distribution mixed with the corpus's ∞-gram one.

Results go to stdout (with --json: one JSON report); each step's start and end, and the servers' start, are
logged on stderr, so a run without a terminal (CI, a pipe) shows where it is."""

from __future__ import annotations

import json
import shlex
import signal
import time
from pathlib import Path

import numpy as np

from ..index.build import run_build
from ..index.errors import UserError
from ..ngram import pipeline_stages
from .cli_common import add_json_flag, console, make_progress, print_json, results

DEMO_CORPUS = Path(__file__).resolve().parents[1] / "index" / "demo" / "shakespeare.jsonl.gz"
# Text queries count the words wherever they stand: after a space, or at the start of a line, as these
# famous lines do (see ngram.engine.text_forms).
PHRASES = ["To be, or not to be", "Double, double, toil and trouble", "The quality of mercy", "pound of flesh",
           "Friends, Romans, countrymen"]
CONTEXT = "To be, or not to be,--that is the"
SCORED = CONTEXT + " question"
QUESTION = "Who poisoned the king of Denmark?"
STARTUP_TIMEOUT = 600   # seconds for a server to load the index (the decoder: convert SmolLM2 on first use)
SERVERS = ("ngram", "retriever", "decoder")
ANSWER_TOKENS = 48
NGRAM_LAMBDA = 0.1      # a light ∞-gram mix: the corpus's words without overriding the instruction model


def register(sub) -> None:
    p = sub.add_parser("demo", help="build an index over the shipped Shakespeare corpus, query n-grams, retrieve "
                       "neighbours, and query the same over the gRPC stack",
                       description=__doc__)
    p.add_argument("--out", type=Path, default=Path("data/demo-index"), metavar="DIR",
                   help="where the demo index goes (default: data/demo-index; reused when up to date)")
    p.add_argument("--corpus", type=Path, default=DEMO_CORPUS, metavar="PATH",
                   help="another corpus to run the demo on (default: the shipped Shakespeare plays)")
    p.add_argument("--no-serve", action="store_true", help="skip starting the gRPC stack")
    for name in SERVERS:
        p.add_argument(f"--{name}-port", type=int, default=0, metavar="P",
                       help=f"the demo's {name} server port (default 0: any free port)")
    add_json_flag(p)
    p.set_defaults(func=cmd_demo)


def _log(msg: str) -> None:
    console.print(f"[dim]demo:[/] {msg}", highlight=False)


def _q(s: str) -> str:
    """A text quoted for the output (JSON string syntax: newlines show as \\n)."""
    return json.dumps(s, ensure_ascii=False)


def ngram_queries(engine) -> dict:
    """The demo's n-gram questions, asked of an Engine (or an NgramClient: the same methods and results)."""
    from ..ngram.engine import count_forms, ntd_forms, text_forms

    counts = {p: count_forms(engine, text_forms(engine.tokenize, p))["count"] for p in PHRASES}
    ntd = ntd_forms(engine, text_forms(engine.tokenize, CONTEXT), max_support=10)
    top = sorted(ntd["result_by_token_id"].items(), key=lambda kv: -kv[1]["cont_cnt"])[:5]
    ids = engine.tokenize(SCORED)
    scored = engine.score_sequence(ids)   # the line's own tokens, as typed
    return {"counts": counts,
            "next_tokens": {"context": CONTEXT, "prompt_cnt": ntd["prompt_cnt"],
                            "top": [{"token": engine.decode([t]), "prob": r["prob"]} for t, r in top]},
            "infgram_prob_per_token": {"text": SCORED, "tokens": [engine.decode([t]) for t in ids],
                                       **{k: np.asarray(v).tolist() for k, v in scored.items()}}}


def cmd_demo(args) -> int:
    if args.corpus == DEMO_CORPUS and not DEMO_CORPUS.is_file():
        raise UserError(f"{DEMO_CORPUS}: the demo corpus is missing from this installation")
    from .cli_serve import check_port_number

    ports = {name: getattr(args, f"{name}_port") for name in SERVERS}
    for name, port in ports.items():
        check_port_number(port, f"--{name}-port")   # whether it is free, the server that binds it says
    report: dict = {}
    seconds: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    _log(f"building the index in {args.out} over {args.corpus}")
    with make_progress(not args.json) as progress:
        summary = run_build(args.out, [str(args.corpus)], None, pipeline_stages(), None, False, {}, progress,
                            log=_log)
    seconds["build"] = time.perf_counter() - t0
    report["build"] = {"index": str(args.out), "ran": summary.ran, "skipped": summary.skipped,
                       "counts": summary.counts, "seconds": round(seconds["build"], 1)}

    from ..index.retriever import Retriever
    from ..ngram.engine import Engine

    _log("n-gram queries: started")
    t0 = time.perf_counter()
    report["ngram"] = ngram_queries(Engine(args.out))
    seconds["ngram"] = time.perf_counter() - t0
    _log(f"n-gram queries: done in {seconds['ngram']:.1f} s")

    _log("retrieval: started (loading the embedder)")
    t0 = time.perf_counter()
    hits = Retriever.open(args.out).search(QUESTION, k=2)[0]
    seconds["retrieve"] = time.perf_counter() - t0
    report["retrieve"] = {"question": QUESTION, "neighbours": [
        {"score": round(h.score, 4), "doc": h.document.get("external_id"), "chunk_id": h.chunk_id,
         "text": h.text} for h in hits]}
    _log(f"retrieval: done in {seconds['retrieve']:.1f} s")

    if not args.no_serve:
        t0 = time.perf_counter()
        report["grpc"] = serve_and_query(args.out, report, ports)
        seconds["grpc"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    if args.json:
        print_json(report)
    else:
        print_report(report, args.out)
    return 0 if report.get("grpc", {}).get("match", True) else 1


def serve_and_query(index_dir: Path, report: dict, ports: dict[str, int]) -> dict:
    """Start the three servers as child processes on loopback (loading at once), ask them the demo's
    questions, generate an answer through the decoder, stop them. A server that does not start is named with its reason, in one line, and every server the
    demo started is stopped."""
    from ..ngram.engine import count_forms, text_forms
    from .cli_serve import CHILD_ENV, startup_failure
    from .client import DecoderClient, NgramClient, RetrieverClient
    from .launch import ServerProcess

    servers: dict[str, ServerProcess] = {}
    extra = {"decoder": ["--kv-cache-gb", "0.25", "--max-running", "4"]}   # the demo asks one question
    try:
        for name in SERVERS:
            _log(f"{name} server: starting")
            servers[name] = ServerProcess(name, index_dir, ports[name],
                                          extra_args=[f"--port-name=--{name}-port", *extra.get(name, [])],
                                          env={CHILD_ENV: "1"})
        for name, server in servers.items():
            ev = server.wait_event({"serving", "failed", "exited"}, STARTUP_TIMEOUT)
            if ev is None or ev["event"] != "serving":
                raise UserError(f"{name} server did not start: {startup_failure(server, ev, STARTUP_TIMEOUT)}")
            _log(f"{name} server: serving on {server.address}")
        with NgramClient(servers["ngram"].address) as nc, RetrieverClient(servers["retriever"].address) as rc:
            counts = {p: count_forms(nc, text_forms(nc.tokenize, p))["count"] for p in PHRASES}
            hits = rc.retrieve(QUESTION, k=2)
        out = {"ngram": servers["ngram"].address, "retriever": servers["retriever"].address,
               "decoder": servers["decoder"].address, "counts": counts,
               "neighbour_chunk_ids": [h["chunk_id"] for h in hits]}
        _log("decoder: generating an answer over gRPC")
        with DecoderClient(servers["decoder"].address) as dc:
            out["answer"] = answer(dc, hits[0]["text"])
    finally:
        for server in servers.values():   # all at once, then wait for each
            server.signal(signal.SIGTERM)
        for name, server in servers.items():
            server.stop()
            _log(f"{name} server: stopped")
    out["match"] = (counts == report["ngram"]["counts"] and
                    out["neighbour_chunk_ids"] == [h["chunk_id"] for h in report["retrieve"]["neighbours"]])
    return out


def answer(client, context: str) -> dict:
    """Retrieve-then-generate: the question with the nearest chunk as context, through the chat template,
    greedy, with a light ∞-gram mix."""
    prompt = (f"Here is a passage from Shakespeare:\n\n{' '.join(context.split())}\n\n"
              f"Using the passage, answer in one sentence: {QUESTION}")
    text, usage = [], {}
    for ev in client.generate(prompt, {"max_tokens": ANSWER_TOKENS, "temperature": 0.0,
                                       "repetition_penalty": 1.1, "ngram_lambda": NGRAM_LAMBDA}, chat=True):
        text.append(ev["text"])
        usage = ev.get("usage") or usage
    return {"question": QUESTION, "text": "".join(text).strip(), "ngram_lambda": NGRAM_LAMBDA, "usage": usage}


def print_report(report: dict, index_dir: Path) -> None:
    """The report for a person, on stdout: what was built, the answers, the timings, what to try next."""
    say = results.print
    b = report["build"]
    built = f"built {', '.join(b['ran'])}" if b["ran"] else "up to date"
    say(f"[bold]index[/] {b['index']}: {built} ({b['counts']['tokenize']['documents']:,} documents, "
        f"{b['counts']['tokenize']['tokens']:,} tokens, {b['counts']['chunks']['chunks']:,} chunks)")
    ng = report["ngram"]
    say("\n[bold]n-gram counts[/] (the words wherever they stand: after a space or at the start of a line)")
    for phrase, n in ng["counts"].items():
        say(f"  {n:>6,}  {phrase}")
    nt = ng["next_tokens"]
    say(f"\n[bold]next token[/] after {_q(nt['context'])} ({nt['prompt_cnt']:,} occurrences)")
    for t in nt["top"]:
        say(f"  {t['prob']:6.3f}  {_q(t['token'])}")
    sc = ng["infgram_prob_per_token"]
    say(f"\n[bold]∞-gram probability[/] of each token of {_q(sc['text'])}, given the longest suffix of the "
        "tokens before it that occurs in the corpus")
    for tok, p, n in zip(sc["tokens"], sc["prob"], sc["suffix_len"]):
        say(f"  {p:6.3f}  {_q(tok):<14} suffix of {n} token{'' if n == 1 else 's'}")
    r = report["retrieve"]
    say(f"\n[bold]nearest chunks[/] to {_q(r['question'])}")
    for h in r["neighbours"]:
        say(f"  {h['score']:.3f}  {h['doc']}, chunk {h['chunk_id']}: {_q(' '.join(h['text'].split())[:100])}")
    if "grpc" in report:
        g = report["grpc"]
        say(f"\n[bold]gRPC stack[/]: n-gram service on {g['ngram']}, retriever on {g['retriever']}, decoder on "
            f"{g['decoder']}; its answers " + ("match the in-process ones" if g["match"]
                                               else "[red]differ from the in-process ones[/]"))
        a, u = g["answer"], g["answer"]["usage"]
        say(f"\n[bold]answer[/] to {_q(a['question'])} (SmolLM2-135M-Instruct over gRPC, prompted with the nearest "
            f"chunk, ∞-gram weight {a['ngram_lambda']}):")
        say(f"  {a['text']}", markup=False)
        say(f"  [dim]{u.get('completion_tokens', 0)} tokens, first after {1e3 * u.get('time_to_first_token_s', 0):.0f} ms, "
            f"{u.get('completion_tokens', 0) / max(u.get('total_s', 0), 1e-9):.1f} tokens/s[/]")
    sec = report["seconds"]
    names = {"build": "build", "ngram": "n-gram queries", "retrieve": "retrieval", "grpc": "gRPC stack"}
    say("\n[bold]timings[/]: " + ", ".join(f"{names[k]} {v:.1f} s" for k, v in sec.items() if k in names)
        + f"; total {sec['total']:.1f} s")
    idx = shlex.quote(str(index_dir))
    say("\n[bold]try next[/]:")
    for cmd in (f"retrogram ngram count --index {idx} \"pound of flesh\"",
                f"retrogram ngram search --index {idx} \"quality of mercy\" --maxnum 2",
                f"retrogram ngram ntd --index {idx} \"my lord\"",
                f"retrogram retrieve --index {idx} \"Who killed Caesar?\"",
                f"retrogram info {idx}",
                f"retrogram generate --index {idx} --ngram-lambda 0.3 --max-tokens 32 \"Who is Ophelia?\"",
                f"retrogram score --index {idx} --ngram-lambda 0.3 \"To be, or not to be, that is the question\"",
                f"retrogram serve --index {idx}   # then: retrogram ngram count --server 127.0.0.1:50051 \"to be\""):
        say(f"  {cmd}", markup=False)
