"""The real-corpora sample for bench.retrieval.search: the first MB_PER_CORPUS of documents of each corpus in
CORPORA_DIR (the output of shared/corpora/fetch.sh), so every corpus is represented; then build-index over it.

    python -m bench.retrieval.corpus [--mb 2] [--corpora /work/corpora] [--out /tmp/retro-bench/idx]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import parser
from retrogram.services.launch import retrogram_command


def write_sample(corpora: Path, out: Path, mb: float) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = int(mb * 1e6)
    with open(out, "w", encoding="utf-8") as f:
        for path in sorted(corpora.glob("*.jsonl")):
            used = 0
            with open(path, encoding="utf-8") as src:
                for line in src:
                    r = json.loads(line)
                    r["collection"] = path.stem
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                    used += len(r.get("text", ""))
                    if used >= budget:
                        break
    return out


def main() -> int:
    ap = parser(__doc__, __spec__)
    ap.add_argument("--corpora", type=Path, default=Path("/work/corpora"))
    ap.add_argument("--mb", type=float, default=2.0, help="characters (millions) of text taken from each corpus")
    ap.add_argument("--out", type=Path, default=Path("/tmp/retro-bench/idx"))
    ap.add_argument("--stages", default="tokenize,chunks,embeddings")
    args = ap.parse_args()
    sample = write_sample(args.corpora, args.out.parent / "sample.jsonl", args.mb)
    cmd = [*retrogram_command(), "build-index", "--corpus", str(sample), "--out",
           str(args.out), "--stages", args.stages, "--no-progress", "--json"]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
