"""What every bench shares: its timers, the stamp on every result (machine, GPU, versions, commit) and the one
current results file per bench and machine, `bench/results/<bench>_<machine tag>.json` (and `.log`), which
each rerun overwrites (older runs live in git history).

Imports the standard library only; torch is imported where a GPU timer or the stamp needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO = BENCH_DIR.parent
LOG: list[str] = []   # what log() printed in this process: saved beside the results


def log(*a) -> None:
    """print, flushed, and kept for the results' .log file."""
    line = " ".join(str(x) for x in a)
    LOG.append(line)
    print(line, flush=True)


def guarded(errors: list, name: str, fn, *a, **kw):
    """fn(*a, **kw), or None when it raises: the error is logged and recorded in errors, since one failing
    section must not cost the rest of a run."""
    try:
        return fn(*a, **kw)
    except Exception as e:
        log(f"!! {name} failed: {e!r}")
        traceback.print_exc()
        errors.append({"section": name, "error": repr(e), "trace": traceback.format_exc()[-3000:]})


# ------------------------------------------------------------------------------------------------ CPU timers
def call_ns(fn, clock=time.thread_time_ns) -> tuple[int, int]:
    """(clock, wall) nanoseconds of one call of fn. time.thread_time_ns counts this thread's CPU time only;
    time.process_time_ns all threads' (for engines that spawn their own)."""
    t0w, t0 = time.perf_counter_ns(), clock()
    fn()
    return clock() - t0, time.perf_counter_ns() - t0w


def median_us(fn, items, clock=time.thread_time_ns) -> float:
    """Median clock microseconds of fn(x) over items."""
    return statistics.median(call_ns(lambda: fn(x), clock)[0] for x in items) / 1000


def per_call_s(fn, min_seconds: float = 1.0):
    """(last result, wall seconds per call): fn called until min_seconds have passed (at least once after an
    untimed first call)."""
    out = fn()
    n, t0 = 0, time.perf_counter()
    while True:
        out = fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return out, dt / n


def percentile(xs, q) -> float | None:
    """The q-th percentile of xs (linear interpolation), None for no samples."""
    if not len(xs):
        return None
    import numpy as np

    return float(np.percentile(np.asarray(xs), q))


# ------------------------------------------------------------------------------------------------ GPU timers
def on_gpu() -> bool:
    """Kernels run compiled on a GPU (not in Triton's CPU interpreter, where the timers below time one call:
    smoke runs only exercise the code)."""
    import torch

    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def check_kernel_device(ap: argparse.ArgumentParser, smoke: bool) -> None:
    """Timings need the kernels compiled for a GPU; a smoke run elsewhere needs Triton's interpreter, which
    must be on before the kernels are imported (TRITON_INTERPRET=1 in the environment)."""
    if on_gpu():
        return
    if not smoke:
        ap.error("needs a CUDA GPU with compiled Triton kernels (TRITON_INTERPRET unset or 0); --smoke runs on a CPU")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        ap.error("--smoke without a GPU: run it with TRITON_INTERPRET=1 (Triton's CPU interpreter)")


def gpu_ms(fn, rep: int = 100, warmup: int = 25) -> float:
    """Median milliseconds of fn (triton's do_bench: an L2 flush before each call)."""
    if not on_gpu():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _captured(fns):
    """One CUDA graph replaying fns in order, compiled and warmed up outside the capture."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g


def graph_ms(fn, rep: int = 100) -> float:
    """Median milliseconds of fn replayed from a CUDA graph: decode steps are short enough that eager
    launches (Python + Triton's launcher) would be timed instead of the GPU work."""
    if not on_gpu():
        return gpu_ms(fn, rep)
    g = _captured([fn])
    ms = gpu_ms(g.replay, rep)
    del g
    return ms


def layers_ms(fns, graph: bool, rep_ms: float = 50, repeats: int = 3) -> float:
    """Time per call of fns (one per layer, each over its own KV cache) run in sequence, repeated back to
    back: as in a decoder step, every call reads a cache the calls before it pushed out of L2. do_bench
    instead flushes L2 with a 256 MB memset before each call, which leaves L2 dirty: writing it back costs a
    short kernel ~10-15 us. graph=True replays all fns from one CUDA graph; False launches them eagerly (CPU
    overhead counts). Median over `repeats` of CUDA-event timings of ~rep_ms each."""
    if not on_gpu():
        return gpu_ms(lambda: [f() for f in fns]) / len(fns)
    import torch

    if graph:
        run = _captured(fns).replay
    else:
        def run():
            for f in fns:
                f()
    run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    n = max(2, int(rep_ms / 1e3 / max(time.perf_counter() - t, 1e-6)))
    times = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(n):
            run()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / n / len(fns))
    return sorted(times)[len(times) // 2]


def cuda_event_s(fn, iters: int = 10, warmup: int = 3) -> float:
    """Median seconds per call of fn between CUDA events (no L2 flush), after warm-up calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------------------ the stamp
def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_tag() -> str:
    """The GPU's model in lower case ('h200', 'h100'), or 'cpu' on a machine without one."""
    name = gpu_name()
    if not name:
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    return (m.group(1) if m else re.sub(r"\W+", "_", name)).lower()


def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def _fixed_stamp() -> dict:
    """The parts of the stamp that do not change during a run."""
    head = _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no")
    torch_version, cuda, gpu_count = _version("torch"), None, 0
    try:
        import torch

        torch_version, cuda = torch.__version__, torch.version.cuda
        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        pass
    return {
        "host": socket.gethostname(), "cpu": _cpu_model(), "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)), "gpu": gpu_name(), "gpu_count": gpu_count, "cuda": cuda,
        "versions": {"python": platform.python_version(), "torch": torch_version, "triton": _version("triton"),
                     "transformers": _version("transformers"), "numpy": _version("numpy"),
                     "faiss": _version("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "faiss"),
                     "grpcio": _version("grpcio")},
        # RETROGRAM_COMMIT names the tree that was run where the copy's .git does not (a device machine's copy)
        "commit": os.environ.get("RETROGRAM_COMMIT") or (head.strip() if head else None),
        "dirty": False if os.environ.get("RETROGRAM_COMMIT") else bool(changed.strip()) if changed is not None else None,
    }


def stamp() -> dict:
    """Where and with what a result was measured: machine (host, CPU model, cores), GPU, versions (python,
    torch, triton, transformers, numpy, faiss, grpcio), retrogram commit and whether tracked files differed
    from it, the command line, the date and the load average."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **_fixed_stamp(),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "command": " ".join(sys.orig_argv)}


# ------------------------------------------------------------------------------------------------ results
def parser(doc: str, spec) -> argparse.ArgumentParser:
    """An argument parser showing the script's docstring, named as it is run (`python -m bench...`)."""
    name = spec.name if spec is not None else Path(sys.argv[0]).name
    return argparse.ArgumentParser(prog=f"python -m {name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, default=None,
                    help=f"folder for the results file <bench>_<tag>.json and its .log (default {RESULTS_DIR}; "
                         "on a device machine $OUT, to bring them back)")
    ap.add_argument("--tag", default=None,
                    help="machine tag in the file name (default: the GPU's model, e.g. h200, or cpu)")


def results_path(bench: str, tag: str | None = None, out: Path | None = None) -> Path:
    return Path(out or RESULTS_DIR) / f"{bench}_{tag or machine_tag()}.json"


def load(bench: str, tag: str) -> dict:
    """The checked-in results of a bench on a machine."""
    return json.loads(results_path(bench, tag).read_text())


def save(bench: str, results: dict, *, out: Path | None = None, tag: str | None = None, merge: bool = False) -> Path:
    """Write results as the current file of this bench and machine, stamped, with this process's log() lines
    beside it. merge=True replaces only results' top-level sections in the existing file (each section keeps
    the stamp of the run that wrote it, under "stamps"): for benches run a section at a time."""
    path = results_path(bench, tag, out)
    st = stamp()
    data = {"bench": bench, "stamp": st}
    if merge:
        base = path if path.is_file() else RESULTS_DIR / path.name   # a device run merges into the checked-in file
        old = json.loads(base.read_text()) if base.is_file() else {}
        stamps = old.pop("stamps", {})
        stamps.update({k: st for k in results})
        old.pop("bench", None), old.pop("stamp", None)
        data["stamps"] = stamps
        data.update(old)
    data.update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
    if LOG:
        path.with_suffix(".log").write_text("\n".join(LOG) + "\n")
    return path
