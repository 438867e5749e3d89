"""`retrogram demo`: the whole job on the embedded defaults. Builds an index over the shipped demo corpus
(Shakespeare), queries n-gram statistics, retrieves neighbours, then starts the gRPC stack and asks it the
same questions over real sockets."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..index.build import run_build
from ..index.errors import UserError
from ..ngram import pipeline_stages
from .cli_common import add_json_flag, console, make_progress, print_json

DEMO_CORPUS = Path(__file__).resolve().parents[1] / "index" / "demo" / "shakespeare.jsonl.gz"
# Queries are token sequences: a phrase that starts a line is tokenized without the leading space that
# the same words carry mid-line, so " pound of flesh" (with the space) is the mid-line form.
PHRASES = ["To be, or not to be", "Double, double, toil and trouble", "The quality of mercy", " pound of flesh",
           "Friends, Romans, countrymen"]
CONTEXT = "To be, or not to be,--that is the"
QUESTION = "Who poisoned the king of Denmark?"


def register(sub) -> None:
    p = sub.add_parser("demo", help="build an index over the shipped Shakespeare corpus, query n-grams, retrieve "
                       "neighbours, and query the same over the gRPC stack",
                       description=__doc__)
    p.add_argument("--out", type=Path, default=Path("data/demo-index"), metavar="DIR",
                   help="where the demo index goes (default: data/demo-index; reused when up to date)")
    p.add_argument("--corpus", type=Path, default=DEMO_CORPUS, metavar="PATH",
                   help="another corpus to run the demo on (default: the shipped Shakespeare plays)")
    p.add_argument("--no-serve", action="store_true", help="skip starting the gRPC stack")
    add_json_flag(p)
    p.set_defaults(func=cmd_demo)


def ngram_queries(engine) -> dict:
    tok = engine.tokenizer
    counts = {p: engine.count(tok.encode(p).tolist())["count"] for p in PHRASES}
    ctx = tok.encode(CONTEXT).tolist()
    ntd = engine.ntd(ctx, max_support=10)
    top = sorted(ntd["result_by_token_id"].items(), key=lambda kv: -kv[1]["cont_cnt"])[:5]
    scored = engine.score_sequence(tok.encode(CONTEXT + " question").tolist())   # numpy arrays per token
    return {"counts": counts,
            "next_tokens": {"context": CONTEXT, "prompt_cnt": ntd["prompt_cnt"],
                            "top": [(tok.decode([t]), r["prob"]) for t, r in top]},
            "infgram_prob_per_token": {"text": CONTEXT + " question",
                                       **{k: np.asarray(v).tolist() for k, v in scored.items()}}}


def cmd_demo(args) -> int:
    if args.corpus == DEMO_CORPUS and not DEMO_CORPUS.is_file():
        raise UserError(f"{DEMO_CORPUS}: the demo corpus is missing from this installation")
    report: dict = {}
    t0 = time.perf_counter()
    with make_progress(not args.json) as progress:
        summary = run_build(args.out, [str(args.corpus)], None, pipeline_stages(), None, False, {}, progress)
    report["build"] = {"index": str(args.out), "ran": summary.ran, "skipped": summary.skipped,
                       "counts": summary.counts, "seconds": round(time.perf_counter() - t0, 1)}
    _say(args, f"[bold green]index[/] {args.out}: built {summary.ran or 'nothing'}, up to date {summary.skipped}")

    from ..index.retriever import Retriever
    from ..ngram.engine import Engine

    engine = Engine(args.out)
    report["ngram"] = ngram_queries(engine)
    for phrase, n in report["ngram"]["counts"].items():
        _say(args, f"count({phrase!r}) = {n}")
    _say(args, f"after {CONTEXT!r}: " + ", ".join(f"{t!r} {p:.2f}" for t, p in report["ngram"]["next_tokens"]["top"]))

    retriever = Retriever.open(args.out)
    hits = retriever.search(QUESTION, k=2)[0]
    report["retrieve"] = {"question": QUESTION, "neighbours": [
        {"score": round(h.score, 4), "doc": h.document.get("external_id"), "chunk_id": h.chunk_id,
         "text": h.text} for h in hits]}
    for h in hits:
        _say(args, f"[bold]{h.score:.3f}[/] {h.document.get('external_id')}: {h.text[:100]!r}")

    if not args.no_serve:
        report["grpc"] = serve_and_query(args.out, report)
        _say(args, f"gRPC stack on {report['grpc']['ngram']} and {report['grpc']['retriever']}: "
                   f"answers match in-process: {report['grpc']['match']}")
    if args.json:
        print_json(report)
    return 0 if report.get("grpc", {}).get("match", True) else 1


def serve_and_query(index_dir: Path, report: dict) -> dict:
    """Start both servers as child processes on loopback, ask them the demo's questions, stop them."""
    from .client import NgramClient, RetrieverClient
    from .launch import ServerProcess

    from ..index.tokenizer import load_index_tokenizer

    tok = load_index_tokenizer(index_dir)
    with ServerProcess("ngram", index_dir).wait_serving() as ng, ServerProcess("retriever", index_dir).wait_serving() as rt:
        with NgramClient(ng.address) as nc, RetrieverClient(rt.address) as rc:
            counts = {p: nc.count(tok.encode(p).tolist())["count"] for p in PHRASES}
            hits = rc.retrieve(QUESTION, k=2)
        out = {"ngram": ng.address, "retriever": rt.address, "counts": counts,
               "neighbour_chunk_ids": [h["chunk_id"] for h in hits]}
    out["match"] = (counts == report["ngram"]["counts"] and
                    out["neighbour_chunk_ids"] == [h["chunk_id"] for h in report["retrieve"]["neighbours"]])
    return out


def _say(args, msg: str) -> None:
    if not args.json:
        console.print(msg)
