"""The n-gram stage at 100M+ tokens: one index built within a 12 GiB `--mem` budget (one shard), the same
token stream built again with a small budget that forces several shards, checked against each other and
against infini-gram 2.6.0, with a few query timings on the large index.

    # the corpora repeated 7x (ids made unique), then both builds with the CLI:
    retrogram build-index --corpus C7.jsonl --out BIG --stages tokenize,ngram --mem 12
    (copy BIG's tokens/, store.sqlite, tokenizer/, manifest.json to SMALL)
    retrogram build-index --corpus C7.jsonl --out SMALL --stages ngram --mem 1.5
    python -m bench.ngram.scale --index BIG --sharded SMALL [--time-log FILE]

Build figures come from each index's manifest (the stage's seconds and the peak RSS of its processes);
--time-log adds /usr/bin/time -v's figures for the whole BIG build command. Results: ngram_scale_<tag>.json.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.common import log, median_us
from retrogram.index.stages.tokenize import TokenStream
from retrogram.ngram import Engine
from retrogram.ngram.build import plan_shards
from retrogram.ngram.reference import open_infinigram

def stage_info(index: Path) -> dict:
    m = json.loads((index / "manifest.json").read_text())
    ng, tok = m["stages"]["ngram"], m["stages"]["tokenize"]
    stream = TokenStream.open(index)
    mem = ng["params"]["mem"]
    plans, processes = plan_shards(stream.doc_offsets, stream.tokens.dtype.itemsize, int(float(mem) * 2**30),
                                   2)
    return {"mem_gib": mem, "shards": ng["counts"]["shards"], "processes_at_once": processes,
            "tokens": ng["counts"]["tokens"], "documents": ng["counts"]["documents"],
            "ngram_seconds": ng["seconds"], "tokenize_seconds": tok.get("seconds"),
            "peak_rss_mb_per_process": ng["counts"]["peak_rss_mb"],
            "peak_rss_mb_bound_all_processes": ng["counts"]["peak_rss_mb"] * processes,
            "shard_tokens": [p.tokens for p in plans]}


def time_log(path: Path) -> dict:
    text = path.read_text()
    grab = lambda pat: re.search(pat, text).group(1)  # noqa: E731
    return {"max_rss_mb": int(grab(r"Maximum resident set size \(kbytes\): (\d+)")) >> 10,
            "wall": grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)"),
            "user_s": float(grab(r"User time \(seconds\): ([\d.]+)")),
            "system_s": float(grab(r"System time \(seconds\): ([\d.]+)"))}


def main() -> None:
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--index", type=Path, required=True, help="the index built with --mem 12")
    ap.add_argument("--sharded", type=Path, required=True, help="the same tokens built with a small --mem")
    ap.add_argument("--time-log", type=Path, help="/usr/bin/time -v output of the --index build")
    ap.add_argument("--queries", type=int, default=2000)
    common.add_output_args(ap)
    args = ap.parse_args()

    res: dict = {"big": stage_info(args.index), "sharded": stage_info(args.sharded)}
    if args.time_log:
        res["big"]["whole_build_command"] = time_log(args.time_log)
    t0 = time.perf_counter()
    big = Engine(args.index)
    res["big"]["engine_open_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sharded = Engine(args.sharded)
    res["sharded"]["engine_open_seconds"] = time.perf_counter() - t0
    assert big.get_total_tok_cnt() == sharded.get_total_tok_cnt()

    toks = TokenStream.open(args.index).tokens
    rng = np.random.default_rng(1)

    def ngram(lo, hi):
        L = int(rng.integers(lo, hi + 1))
        p = int(rng.integers(0, len(toks) - L))
        return [int(x) for x in toks[p:p + L]]

    n = args.queries
    queries = [ngram(1, 8) for _ in range(n)] + [list(map(int, rng.integers(0, 49152, 3))) for _ in range(n // 10)]
    contexts = [ngram(20, 60) for _ in range(n // 4)]
    cnfs = [[[ngram(1, 1)], [ngram(1, 2), ngram(1, 1)]] for _ in range(n // 20)]
    # the shards add up to the single-shard index, and both equal infini-gram on the same files
    counts = big.count_many(queries)
    assert np.array_equal(counts, sharded.count_many(queries))
    ig_big = open_infinigram(args.index / "ngram", big.width, big.eos_token_id, big.vocab_size)
    ig_sh = open_infinigram(args.sharded / "ngram", big.width, big.eos_token_id, big.vocab_size)
    for q, c in zip(queries[::10], counts[::10]):
        assert ig_big.count(q)["count"] == ig_sh.count(q)["count"] == c
    for q in contexts[::5]:
        want = ig_big.infgram_prob(q[:-1], q[-1])
        assert big.infgram_prob(q[:-1], q[-1]) == want == sharded.infgram_prob(q[:-1], q[-1])
        assert ig_sh.infgram_prob(q[:-1], q[-1]) == want
    for c in cnfs:
        assert big.count_cnf(c, 50000, 100) == ig_big.count_cnf(c, 50000, 100)
        assert sharded.count_cnf(c, 50000, 100) == ig_sh.count_cnf(c, 50000, 100)
    res["checked"] = {"count_many_queries_equal_across_builds": len(queries), "vs_infinigram_count": len(queries[::10]),
                      "vs_infinigram_infgram_prob": len(contexts[::5]), "vs_infinigram_count_cnf": len(cnfs)}
    # a few timings on the 100M index (CPU-time medians; ours in the calling thread, infini-gram all threads),
    # after one untimed pass of every query on every engine (page faults of the fresh mappings)
    for eng in (big, sharded, ig_big):
        for q in queries:
            eng.count(q)
        for q in contexts:
            eng.infgram_prob(q[:-1], q[-1])
    rows = {}
    for name, eng in (("one_shard", big), ("sharded", sharded)):
        per = []
        for _ in range(5):
            t = time.thread_time_ns()
            eng.count_many(queries)
            per.append((time.thread_time_ns() - t) / len(queries) / 1000)
        rows[f"count_many_us_per_query_{name}"] = statistics.median(per)
        rows[f"count_us_{name}"] = median_us(eng.count, queries)
        rows[f"infgram_prob_us_{name}"] = median_us(lambda q: eng.infgram_prob(q[:-1], q[-1]), contexts)
    rows["infinigram_count_us_one_shard"] = median_us(ig_big.count, queries, time.process_time_ns)
    rows["infinigram_infgram_prob_us_one_shard"] = median_us(lambda q: ig_big.infgram_prob(q[:-1], q[-1]), contexts,
                                                             time.process_time_ns)
    res["queries"] = rows
    for k, v in res.items():
        log(k, json.dumps(v))
    log(f"wrote {common.save('ngram_scale', res, out=args.out, tag=args.tag)}")


if __name__ == "__main__":
    main()
