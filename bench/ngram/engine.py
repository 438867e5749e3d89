"""The n-gram engine against infini-gram 2.6.0, side by side in one run, on the same index files.

    python -m bench.ngram.engine --corpus /work/corpora --index /work/scratch/real   # builds the index if needed

Every query runs on both engines, interleaved, the same queries in the same order; the figures are
medians of per-call CPU time (time.thread_time_ns for ours, which runs in the calling thread;
time.process_time_ns for infini-gram, whose engine spawns threads per shard and per query), with wall
medians beside them. infini-gram runs with prefetching off (its fastest setting here). The suffix-array
build is timed against infini-gram's Rust indexer on the same tokenized.0. Results: ngram_<tag>.json.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.common import call_ns, log
from retrogram.index.stages.tokenize import TokenStream
from retrogram.ngram import Engine
from retrogram.ngram.build import build_ngram_dir
from retrogram.ngram.reference import build_table_with_infinigram, copy_shard_inputs, open_infinigram

TARGETS = {"count": 1 / 3, "prob": 1 / 3, "infgram_prob": 1 / 3, "search_docs": 1 / 2, "count_cnf": 1 / 2,
           "ntd": 1 / 10}


def side_by_side(name, queries, ours, theirs, check=None):
    """Per-call (cpu, wall) nanoseconds for each engine over the queries, interleaved."""
    o_cpu, o_wall, t_cpu, t_wall = [], [], [], []
    for q in queries:
        c, w = call_ns(lambda: ours(q), time.thread_time_ns)
        o_cpu.append(c)
        o_wall.append(w)
        c, w = call_ns(lambda: theirs(q), time.process_time_ns)
        t_cpu.append(c)
        t_wall.append(w)
        if check:
            check(q)
    med = lambda xs: statistics.median(xs) / 1000  # noqa: E731  (microseconds)
    row = {"queries": len(queries), "ours_cpu_us": med(o_cpu), "infinigram_cpu_us": med(t_cpu),
           "ours_wall_us": med(o_wall), "infinigram_wall_us": med(t_wall)}
    row["ratio_cpu"] = row["ours_cpu_us"] / row["infinigram_cpu_us"]
    row["ratio_wall"] = row["ours_wall_us"] / row["infinigram_wall_us"]
    if name in TARGETS:
        row["target_ratio"] = TARGETS[name]
        row["met"] = row["ratio_cpu"] <= TARGETS[name]
    log(f"{name:<14} ours {row['ours_cpu_us']:9.2f} us   infini-gram {row['infinigram_cpu_us']:9.2f} us   "
          f"ratio {row['ratio_cpu']:.3f} (wall {row['ratio_wall']:.3f})"
          + (f"   target <= {TARGETS[name]:.3f}: {'met' if row['met'] else 'NOT met'}" if name in TARGETS else ""))
    return row


def held_out_tokens(engine: Engine, n: int) -> list[int]:
    """n tokens of text that is not in the corpora: numpy's own Python sources."""
    text = "".join(p.read_text(errors="replace") for p in sorted(Path(np.__file__).parent.glob("_core/*.py"))[:40])
    ids = engine.tokenize(text)
    return ids[:n]


def main() -> None:
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--corpus", default="/work/corpora")
    ap.add_argument("--index", type=Path, default=Path("/work/scratch/real"))
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--mem", type=float, default=4)
    common.add_output_args(ap)
    args = ap.parse_args()

    if not (args.index / "ngram").is_dir():
        from retrogram.index.build import run_build
        from retrogram.ngram import pipeline_stages

        run_build(args.index, [args.corpus], None, pipeline_stages(), ["ngram"], options={"mem": args.mem})
    results: dict = {}

    # -- build: ours vs infini-gram's Rust indexer, same tokens -------------------------------------------
    with tempfile.TemporaryDirectory(prefix="rg-bench-", dir=args.index.parent) as tmp:
        ours_dir, rust_dir = Path(tmp) / "ours", Path(tmp) / "rust"
        info = build_ngram_dir(args.index, ours_dir, args.mem, 2)
        copy_shard_inputs(ours_dir, rust_dir, metadata=False)
        rust_s = build_table_with_infinigram(rust_dir, 0, 2, args.mem, 2)
        same = (ours_dir / "table.0").read_bytes() == (rust_dir / "table.0").read_bytes()
        sort_s = sum(r["seconds_sort"] + r["seconds_table"] for r in info["shard_results"])
        results["build"] = {"tokens": info["tokens"], "ours_seconds": info["seconds"],
                            "ours_tokens_per_s": info["tokens"] / info["seconds"],
                            "ours_table_seconds": sort_s, "ours_table_tokens_per_s": info["tokens"] / sort_s,
                            "infinigram_rust_seconds": rust_s, "infinigram_rust_tokens_per_s": info["tokens"] / rust_s,
                            "tables_identical": same, "ours_peak_rss_mb": info["peak_rss_bytes"] >> 20}
        log(f"build: ours {info['seconds']:.2f}s for {info['tokens']:,} tokens (all files; table alone {sort_s:.2f}s), "
              f"infini-gram Rust indexer {rust_s:.2f}s (table only); tables identical: {same}")
        shutil.rmtree(rust_dir)

    t0 = time.perf_counter()
    ours = Engine(args.index)
    open_s = time.perf_counter() - t0   # includes loading the compiled kernels and the prefix buckets
    eos = ours.eos_token_id
    ig = open_infinigram(args.index / "ngram", ours.width, eos, ours.vocab_size)
    stream = TokenStream.open(args.index)
    rng = np.random.default_rng(0)
    toks = stream.tokens

    def ngram(lo, hi):
        L = int(rng.integers(lo, hi + 1))
        p = int(rng.integers(0, len(toks) - L))
        return [int(x) for x in toks[p:p + L]]

    n = args.queries
    queries = [ngram(1, 8) for _ in range(n)]
    contexts = [ngram(20, 60) for _ in range(n // 2)]
    short = [ngram(1, 2) for _ in range(n // 4)]
    cnfs = [[[ngram(1, 1)], [ngram(1, 2), ngram(1, 1)]] for _ in range(n // 4)]
    # warm both (compilation, page cache)
    for q in queries[:50]:
        ours.count(q), ig.count(q)

    def same(a, b):
        assert a == b, (a, b)

    rows = {}
    rows["count"] = side_by_side("count", queries, ours.count, ig.count, lambda q: same(ours.count(q), ig.count(q)))
    rows["prob"] = side_by_side("prob", queries, lambda q: ours.prob(q[:-1], q[-1]), lambda q: ig.prob(q[:-1], q[-1]))
    rows["infgram_prob"] = side_by_side("infgram_prob", contexts, lambda q: ours.infgram_prob(q[:-1], q[-1]),
                                        lambda q: ig.infgram_prob(q[:-1], q[-1]),
                                        lambda q: same(ours.infgram_prob(q[:-1], q[-1]), ig.infgram_prob(q[:-1], q[-1])))
    rows["ntd"] = side_by_side("ntd", short, lambda q: ours.ntd(q, 1000), lambda q: ig.ntd(q, 1000))
    rows["infgram_ntd"] = side_by_side("infgram_ntd", contexts[:n // 4], lambda q: ours.infgram_ntd(q, 1000),
                                       lambda q: ig.infgram_ntd(q, 1000))
    rows["search_docs"] = side_by_side("search_docs", queries[:n // 2], lambda q: ours.search_docs(q, 1, 100),
                                       lambda q: ig.search_docs(q, 1, 100))
    rows["count_cnf"] = side_by_side("count_cnf", cnfs, lambda c: ours.count_cnf(c, 50000, 100),
                                     lambda c: ig.count_cnf(c, 50000, 100),
                                     lambda c: same(ours.count_cnf(c, 50000, 100), ig.count_cnf(c, 50000, 100)))
    # count_many: one call for every query (the median of 5 calls)
    batch = queries * 5
    pers = []
    for _ in range(5):
        t0 = time.thread_time_ns()
        counts = ours.count_many(batch)
        pers.append((time.thread_time_ns() - t0) / len(batch) / 1000)
    per = statistics.median(pers)
    assert [int(c) for c in counts[:n]] == [ig.count(q)["count"] for q in queries]
    rows["count_many"] = {"queries": len(batch), "ours_cpu_us_per_query": per, "calls_us_per_query": pers,
                          "target_us": 2.0, "met": per <= 2.0}
    log(f"count_many     ours {per:.3f} us per query ({len(batch)} queries in one call)   target <= 2 us: "
          f"{'met' if per <= 2.0 else 'NOT met'}")
    # score_sequence over held-out text vs infgram_prob once per position
    seq = held_out_tokens(ours, 10_000)
    t0 = time.thread_time_ns()
    scored = ours.score_sequence(seq)
    ours_per = (time.thread_time_ns() - t0) / len(seq) / 1000
    positions = list(range(1, len(seq), 10))
    ig_cpu = []
    for i in positions:
        c, _ = call_ns(lambda: ig.infgram_prob(seq[:i], seq[i]), time.process_time_ns)
        ig_cpu.append(c)
    for i in positions[::20]:
        r = ig.infgram_prob(seq[:i], seq[i])
        assert (r["suffix_len"], r["prompt_cnt"], r["cont_cnt"]) == (
            scored["suffix_len"][i], scored["prompt_cnt"][i], scored["cont_cnt"][i])
    ig_per = statistics.mean(ig_cpu) / 1000
    rows["score_sequence"] = {"tokens": len(seq), "ours_cpu_us_per_token": ours_per,
                              "infinigram_infgram_prob_cpu_us_per_token": ig_per,
                              "speedup": ig_per / ours_per, "target_speedup": 20, "met": ig_per / ours_per >= 20,
                              "mean_suffix_len": float(np.mean(scored["suffix_len"]))}
    log(f"score_sequence ours {ours_per:.2f} us/token   infini-gram infgram_prob per position {ig_per:.2f} us/token   "
          f"speedup {ig_per / ours_per:.1f}x   target >= 20x: {'met' if ig_per / ours_per >= 20 else 'NOT met'}")
    results["queries"] = rows
    results["index"] = {"tokens": ours.get_total_tok_cnt(), "documents": ours.get_total_doc_cnt(),
                        "shards": ours.get_num_shards(), "token_width": ours.width, "engine_open_seconds": open_s}
    log(f"wrote {common.save('ngram', results, out=args.out, tag=args.tag)}")


if __name__ == "__main__":
    main()
