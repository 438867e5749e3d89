"""Tokenize + store throughput (issue 2) against a single-process `tokenizer(batch)` loop, and peak memory
of the build on the corpus and on the corpus concatenated N times.

    python -m bench.index.tokenize --corpus /path/to/corpora [--repeat 10]

Baseline and ours run interleaved for --rounds pairs; medians are reported. The baseline reads the same
JSONL documents and calls the transformers tokenizer on batches of 1,000 texts in one process (its Rust
backend may use both cores itself); it stores nothing. Ours is the real `tokenize` stage: parse, tokenize
in worker processes, write the token stream and the SQLite store. Peak memory is the whole process tree's
RSS, sampled every 20 ms. Results: tokenize_<tag>.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from bench import common
from bench.common import log
from retrogram.services.launch import retrogram_command


def baseline(files: list[Path]) -> dict:
    from retrogram.index.corpus import iter_documents
    from retrogram.index.tokenizer import load_tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(load_tokenizer(None).files[0].parent))   # SmolLM2's, via transformers
    t0, n_tok, batch = time.perf_counter(), 0, []
    for doc in iter_documents(files):
        batch.append(doc.text)
        if len(batch) == 1000:
            n_tok += sum(len(x) for x in hf(batch, add_special_tokens=False)["input_ids"])
            batch = []
    if batch:
        n_tok += sum(len(x) for x in hf(batch, add_special_tokens=False)["input_ids"])
    return {"seconds": time.perf_counter() - t0, "tokens": n_tok}


def run_build_measured(corpus: list[Path], out: Path) -> dict:
    """`retrogram build-index --stages tokenize` in a subprocess; wall time and peak tree RSS."""
    cmd = [*retrogram_command(), "build-index", "--stages", "tokenize", "--out", str(out),
           "--json", "--no-progress"] + [a for f in corpus for a in ("--corpus", str(f))]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"build failed: {stderr}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "peak_rss_mib": peak / 2**20, "tokens": summary["counts"]["tokenize"]["tokens"],
            "documents": summary["counts"]["tokenize"]["documents"]}


def main() -> None:
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--corpus", type=Path, required=True, help="directory of *.jsonl (shared/corpora/fetch.sh output)")
    ap.add_argument("--repeat", type=int, default=10, help="times the corpus is concatenated for the memory check")
    ap.add_argument("--rounds", type=int, default=3, help="baseline/ours pairs, interleaved (the machine is shared)")
    common.add_output_args(ap)
    args = ap.parse_args()
    files = sorted(args.corpus.glob("*.jsonl"))
    size = sum(f.stat().st_size for f in files)
    work = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    try:
        bases, ourss = [], []
        for r in range(args.rounds):   # interleaved, so both see the same load on a shared machine
            bases.append(baseline(files))
            ourss.append(run_build_measured(files, work / f"idx1-{r}"))
            assert ourss[-1]["tokens"] == bases[-1]["tokens"], (ourss[-1]["tokens"], bases[-1]["tokens"])
            shutil.rmtree(work / f"idx1-{r}")
            log(f"round {r}: baseline {bases[-1]['seconds']:.1f}s, ours {ourss[-1]['seconds']:.1f}s")
        base = sorted(bases, key=lambda b: b["seconds"])[len(bases) // 2]
        ours = sorted(ourss, key=lambda b: b["seconds"])[len(ourss) // 2]
        big = work / "corpus_x.jsonl"
        with open(big, "wb") as out:
            for _ in range(args.repeat):
                for f in files:
                    with open(f, "rb") as src:
                        shutil.copyfileobj(src, out)
        ours_big = run_build_measured([big], work / "idx10")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "corpus_bytes": size, "files": [f.name for f in files],
        "baseline_single_process_tokenizer_batch": {**base, "mb_per_s": size / 1e6 / base["seconds"]},
        "ours_tokenize_stage": {**ours, "mb_per_s": size / 1e6 / ours["seconds"]},
        "speedup": base["seconds"] / ours["seconds"],
        "rounds": [{"baseline_s": b["seconds"], "ours_s": o["seconds"], "speedup": b["seconds"] / o["seconds"]}
                   for b, o in zip(bases, ourss)],
        "load_average_at_end": os.getloadavg(),
        f"ours_corpus_x{args.repeat}": {**ours_big, "mb_per_s": args.repeat * size / 1e6 / ours_big["seconds"]},
        "peak_rss_ratio_x{}_vs_x1".format(args.repeat): ours_big["peak_rss_mib"] / ours["peak_rss_mib"],
    }
    log(json.dumps(result, indent=2))
    log(f"wrote {common.save('tokenize', result, out=args.out, tag=args.tag)}")


if __name__ == "__main__":
    main()
