"""Where a batch-1 decode step and a 512-token prefill spend their time (torch profiler), on a random model of
SmolLM2-135M's shape: the table of the top operations by device time and by host time, and the wall time
of each. For finding what keeps batch 1 host-bound.

    python -m bench.decoder.profile [--steps 20] [--rows 15]
"""

from __future__ import annotations

import math
import time

import torch

from bench import common
from bench.common import log


def main(argv=None) -> int:
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from bench.decoder.generate import models, prompt_ids
    from retrogram.retro.generate import CUDAGraphDecoder, prefill

    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the decode step it profiles is the CUDA-graph one)")
    device = "cuda"
    _, model, cfg = models("smollm2", device)
    ids = prompt_ids(cfg, 512)
    cache = model.new_cache(math.ceil((512 + 64 + args.steps) / 64) + 1, 64)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    sync = torch.cuda.synchronize

    prefill(model, cache, "warm", ids)                           # compile and autotune outside the profile
    cache.free("warm")
    sync()
    t = time.perf_counter()
    logits = prefill(model, cache, 0, ids)
    sync()
    log(f"prefill 512 tokens: {1e3 * (time.perf_counter() - t):.2f} ms wall")
    cache.free(0)
    with profile(activities=activities) as prof:
        logits = prefill(model, cache, 0, ids)
        sync()
    log(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows))
    from retrogram.retro.graphs import PrefillGraphs

    graphs = PrefillGraphs(model, cache, 1024)
    for _ in range(2):                                           # capture the 512 bucket, then time a replay
        cache.free(0)
        sync()
        t = time.perf_counter()
        logits = graphs.prefill(0, torch.tensor(ids, device=device))
        sync()
    log(f"prefill 512 tokens as a CUDA graph: {1e3 * (time.perf_counter() - t):.2f} ms wall")
    step = CUDAGraphDecoder(model, cache, 0, cache.length(0) + 2 * args.steps + 16).step
    tok = logits.argmax()
    for _ in range(3):                                           # capture and warm the graph
        tok = step(tok).argmax()
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        tok = step(tok).argmax()
        int(tok)                                                 # what generate() does each token (streaming)
    sync()
    log(f"decode step (CUDA graph, with the per-token host sync): {1e3 * (time.perf_counter() - t) / args.steps:.3f} ms")
    t = time.perf_counter()
    for _ in range(args.steps):
        tok = step(tok).argmax()
    sync()
    log(f"decode step (CUDA graph, no per-token sync): {1e3 * (time.perf_counter() - t) / args.steps:.3f} ms")
    with profile(activities=activities) as prof:
        for _ in range(5):
            tok = step(tok).argmax()
            int(tok)
    log(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
