"""infini-gram 2.6.0 (the anchor), driven on our shard files: for the comparison tests and the benchmark.

infini-gram is a test/bench dependency only (`pip install infini-gram==2.6.0`); nothing else imports this.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HACK = 100000   # infini-gram's overlap between the parts its indexer sorts separately (bytes)


def rust_indexer() -> Path:
    import infini_gram

    path = Path(infini_gram.__file__).parent / "rust_indexing"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: infini-gram's Rust indexer is missing")
    return path


def build_table_with_infinigram(directory: Path, k: int, width: int, mem_gib: float, cpus: int) -> float:
    """Write table.K for tokenized.K with infini-gram's Rust indexer, exactly as its indexing.py's
    build_sa does (make-part in parallel batches, merge, concat). Returns the seconds it took."""
    directory = Path(directory)
    ds_path, sa_path = directory / f"tokenized.{k}", directory / f"table.{k}"
    exe = str(rust_indexer())
    t0 = time.perf_counter()
    ds_size = ds_path.stat().st_size
    ratio = int(math.ceil(math.log2(ds_size) / 8))
    mem_bytes = int(mem_gib * 1024**3)
    num_job_batches = 1
    while num_job_batches * (mem_bytes // (12 if width == 1 else 8)) < ds_size:
        num_job_batches *= 2
    total_jobs = num_job_batches * cpus
    S = ds_size // total_jobs
    if S % width:
        S += width - S % width
    with tempfile.TemporaryDirectory(prefix="infinigram-build-") as tmp:
        parts, merged = Path(tmp) / "parts", Path(tmp) / "merged"
        parts.mkdir()
        merged.mkdir()
        for batch_start in range(0, total_jobs, cpus):
            procs = []
            for i in range(batch_start, min(batch_start + cpus, total_jobs)):
                s, e = i * S, min((i + 1) * S + HACK, ds_size)
                procs.append(subprocess.Popen([exe, "make-part", "--data-file", str(ds_path), "--parts-dir", str(parts),
                                               "--start-byte", str(s), "--end-byte", str(e), "--ratio", str(ratio),
                                               "--token-width", str(width)], stdout=subprocess.DEVNULL))
            if any(p.wait() for p in procs):
                raise RuntimeError("infini-gram make-part failed")
        subprocess.run([exe, "merge", "--data-file", str(ds_path), "--parts-dir", str(parts), "--merged-dir", str(merged),
                        "--num-threads", str(cpus), "--hacksize", str(HACK), "--ratio", str(ratio),
                        "--token-width", str(width)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([exe, "concat", "--data-file", str(ds_path), "--merged-dir", str(merged), "--merged-file",
                        str(sa_path), "--num-threads", str(cpus), "--ratio", str(ratio), "--token-width", str(width)],
                       check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def copy_shard_inputs(src: Path, dst: Path, k: int = 0, metadata: bool = True) -> None:
    """Copy tokenized.K / offset.K (and the metadata files) of a shard, leaving table.K to be built."""
    dst.mkdir(parents=True, exist_ok=True)
    names = ["tokenized", "offset"] + (["metadata", "metaoff"] if metadata else [])
    for name in names:
        if (Path(src) / f"{name}.{k}").is_file():
            shutil.copyfile(Path(src) / f"{name}.{k}", dst / f"{name}.{k}")


def open_infinigram(directories, width: int, eos_token_id: int, vocab_size: int | None = None):
    """infini-gram's engine on shard directories, prefetching off (its fastest setting for our queries)."""
    from infini_gram.engine import InfiniGramEngine

    dtype = f"u{8 * width}"   # infini-gram's token_dtype name
    if isinstance(directories, (str, os.PathLike)):
        directories = [directories]
    return InfiniGramEngine(index_dir=[str(d) for d in directories], eos_token_id=eos_token_id,
                            vocab_size=vocab_size or (1 << (8 * width)) - 1, token_dtype=dtype,
                            ds_prefetch_depth=0, sa_prefetch_depth=0, od_prefetch_depth=0)
