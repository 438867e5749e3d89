"""The n-gram engine of this checkout against the engine of another commit, side by side in one run, on the
same index and the same queries (for reshapings that must not slow the engine down).

    python -m bench.ngram.ab --baseline REV [--index IDX] [--queries 2000] [--rounds 5]

The baseline commit is checked out into a temporary git worktree and imported as `retrogram` by a child
process with this checkout's installed finder removed (the same interpreter and packages). Each round runs
both engines in turn in fresh processes; each reports the median per-call CPU time of every query kind
over the same queries (count, prob, ntd, infgram_prob, search_docs). The figure is the median over rounds of
ours / baseline. The index is built here over the demo corpus (tokenize + ngram) unless --index is given;
both engines read the same files. Results: ngram_ab_<tag>.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import common
from bench.common import log

PACKAGES = ("index", "ngram", "retro", "kernels", "services", "protos")

# The child: import `retrogram` from PKG_ROOT (a farm of links to a checkout's folders), time the engine.
CHILD = r"""
import json, os, sys, time, statistics
root = os.environ["PKG_ROOT"]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                    and "editable" not in getattr(f, "__name__", "").lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path.insert(0, root)
sys.path_importer_cache.clear()
for m in [m for m in sys.modules if m == "retrogram" or m.startswith("retrogram.")]:
    del sys.modules[m]
from retrogram.ngram.engine import Engine
import retrogram.ngram.engine as mod
assert mod.__file__.startswith(root), mod.__file__
queries = json.loads(os.environ["QUERIES"])
e = Engine(os.environ["INDEX"])
def per_call(fn, items):
    out = []
    for q in items:
        t = time.thread_time_ns(); fn(q); out.append(time.thread_time_ns() - t)
    return statistics.median(out) / 1e3
kinds = {
    "count": lambda q: e.count(q),
    "prob": lambda q: e.prob(q[:-1], q[-1]),
    "ntd": lambda q: e.ntd(q[:-1], max_support=100),
    "infgram_prob": lambda q: e.infgram_prob(q[:-1], q[-1]),
    "search_docs": lambda q: e.search_docs(q, maxnum=1, max_disp_len=20),
}
for f in kinds.values():   # warm-up (numba compiles)
    for q in queries[:20]:
        f(q)
print(json.dumps({k: per_call(f, queries) for k, f in kinds.items()}))
"""


def farm(src: Path, dst: Path) -> Path:
    pkg = dst / "retrogram"
    pkg.mkdir(parents=True)
    for name in PACKAGES:
        if (src / name).is_dir():
            os.symlink(src / name, pkg / name)
    return dst


def run_child(root: Path, index: Path, queries: list) -> dict:
    env = {**os.environ, "PKG_ROOT": str(root), "INDEX": str(index), "QUERIES": json.dumps(queries)}
    r = subprocess.run([sys.executable, "-P", "-c", CHILD], env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"engine child ({root}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--baseline", required=True, metavar="REV", help="the commit to compare against")
    ap.add_argument("--index", type=Path, default=None, help="an index with the ngram stage (default: the demo's)")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    common.add_output_args(ap)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ngram_ab_"))
    index = args.index
    if index is None:
        from retrogram.index.build import run_build
        from retrogram.ngram import pipeline_stages

        index = tmp / "idx"
        run_build(index, [str(common.REPO / "index" / "demo" / "shakespeare.jsonl.gz")], None, pipeline_stages(),
                  ["tokenize", "ngram"], options={})
    import numpy as np

    from retrogram.index.stages.tokenize import TokenStream
    from retrogram.ngram import Engine

    eng = Engine(index)
    arr = np.asarray(TokenStream.open(index).tokens)
    rng = np.random.default_rng(0)
    queries = []
    while len(queries) < args.queries:
        n = int(rng.integers(2, 9))
        at = int(rng.integers(0, len(arr) - n))
        q = [int(t) for t in arr[at:at + n]]
        if max(q) < eng.tokenizer.vocab_size:   # no document separators
            queries.append(q)
    base = tmp / "baseline"
    subprocess.run(["git", "-C", str(common.REPO), "worktree", "add", "--detach", "-q", str(base), args.baseline],
                   check=True)
    try:
        roots = {"ours": farm(common.REPO, tmp / "ours_pkg"), "baseline": farm(base, tmp / "base_pkg")}
        rounds = []
        for i in range(args.rounds):
            r = {name: run_child(root, index, queries) for name, root in roots.items()}
            rounds.append(r)
            log(f"round {i}: " + ", ".join(f"{k} {r['ours'][k]:.2f}/{r['baseline'][k]:.2f} us"
                                           for k in r["ours"]))
    finally:
        subprocess.run(["git", "-C", str(common.REPO), "worktree", "remove", "--force", str(base)], check=False)
    kinds = list(rounds[0]["ours"])
    table = {k: {"ours_us": statistics.median(r["ours"][k] for r in rounds),
                 "baseline_us": statistics.median(r["baseline"][k] for r in rounds),
                 "ratio": statistics.median(r["ours"][k] / r["baseline"][k] for r in rounds)} for k in kinds}
    for k, v in table.items():
        log(f"{k:13s} ours {v['ours_us']:8.2f} us  baseline {v['baseline_us']:8.2f} us  ours/baseline {v['ratio']:.3f}")
    path = common.save("ngram_ab", {"baseline": args.baseline, "queries": len(queries), "rounds": args.rounds,
                                     "index_tokens": int(eng.get_total_tok_cnt()), "per_call": table},
                       out=args.out, tag=args.tag)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
