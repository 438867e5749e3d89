"""Full-corpora retrieval bench for one machine with a GPU (run on the lent H200 host: 16 CPU cores).

Embeds ALL chunks of an index (the five corpora of shared/corpora/fetch.sh) with the project's embedder
(`retrogram.index.embedder.Embedder`, fp16 on the GPU), then, on that machine's CPUs, runs bench.retrieval.search's
recall/QPS sweeps with faiss-cpu through `FaissSearcher` (the product path: FAISS, then exact re-ranking of
the shortlist against the float16 embeddings) against exact search (faiss Flat) in the same run, each at
1 thread and at all threads:

  real       1,000 held-out chunk queries against the other chunks: IVF{by size},SQ8 + re-rank,
             IVF{by size},Flat, HNSW32,Flat
  synthetic  5,000,000 vectors from the Gaussian mixture fitted to those real embeddings
             (bench.retrieval.search.synthetic_vectors; drawn on the GPU), IVF4096,SQ8 + re-rank

Ground-truth neighbours (for recall) come from a float32 matmul + topk on the GPU; exact search's
queries/s is faiss Flat's on the CPU. Embeddings stay on the machine (too large to bring back); only the
JSON comes back. Results are written after each step, so a run cut short still reports what it did.

    python -m bench.retrieval.full --index IDX [--model MODEL_DIR] [--out DIR]

Results: retrieval_full_<tag>.json (written after each step).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.retrieval import search as br


def gpu_exact(db: np.ndarray, q: np.ndarray, k: int, block: int = 1 << 21) -> np.ndarray:
    """Exact top-k ids (float32 inner products on the GPU, blocked over the database)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(dev)
    best_s = torch.full((len(q), k), -float("inf"), device=dev)
    best_i = torch.full((len(q), k), -1, dtype=torch.int64, device=dev)
    for lo in range(0, len(db), block):
        x = torch.from_numpy(np.ascontiguousarray(db[lo: lo + block])).to(dev).float()
        s, i = torch.topk(qt @ x.T, min(k, len(x)), dim=1)
        cs, ci = torch.cat([best_s, s], 1), torch.cat([best_i, i + lo], 1)
        top = torch.topk(cs, k, dim=1).indices
        best_s, best_i = cs.gather(1, top), ci.gather(1, top)
    return best_i.cpu().numpy()


def faiss_exact_qps(db: np.ndarray, qs: dict, k: int, block: int = 1 << 19) -> dict:
    """{threads: queries/s} of exact search with faiss Flat over float32 blocks of the float16 database, for
    qs = {threads: queries}; the search calls are timed (one per block), not the float16 -> float32 conversion."""
    import faiss

    total = dict.fromkeys(qs, 0.0)
    for lo in range(0, len(db), block):
        flat = faiss.IndexFlatIP(db.shape[1])
        flat.add(np.ascontiguousarray(db[lo: lo + block], dtype=np.float32))
        for nt, q in qs.items():
            faiss.omp_set_num_threads(nt)
            if lo == 0:
                flat.search(q[:32], k)   # warm-up
            t = time.perf_counter()
            flat.search(q, k)
            total[nt] += time.perf_counter() - t
        del flat
    return {nt: len(qs[nt]) / total[nt] for nt in qs}


def main() -> int:
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--index", type=Path, required=True, help="index with the tokenize and chunks stages")
    ap.add_argument("--model", default=None, help="embedder directory (default: the packaged MiniLM)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--exact-queries-1t", type=int, default=200, help="queries timed for 1-thread exact search")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, default=4)
    ap.add_argument("--n-synthetic", type=int, default=5_000_000)
    ap.add_argument("--nlist-synthetic", type=int, default=4096)
    ap.add_argument("--train-synthetic", type=int, default=160_000)
    ap.add_argument("--clusters", type=int, default=1024)
    ap.add_argument("--scratch", default="/tmp/retro-full")
    ap.add_argument("--min-seconds", type=float, default=0.3)
    ap.add_argument("--limit-chunks", type=int, default=0, help="embed only the first N chunks (smoke tests)")
    ap.add_argument("--steps", default="real_ivf,synthetic,real_hnsw,real_ivf_flat")
    common.add_output_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import faiss
    import torch

    from retrogram.index.stages.chunks import ChunkTable
    from retrogram.index.embedder import Embedder
    from retrogram.index.stages.embeddings import chunk_texts
    from retrogram.index.stages.faiss import choose_factory

    all_t = os.cpu_count() or 1
    threads = [1, all_t]
    out: dict = {"cpu_threads": all_t, "k": args.k, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
                 "timing": f"each point: repeated calls for >= {args.min_seconds}s after one warm-up call"}

    def save():
        common.save("retrieval_full", out, out=args.out, tag=args.tag)

    def log(*a):
        common.log(f"[{time.perf_counter() - t00:6.1f}s]", *a)

    t00 = time.perf_counter()
    # -- embed every chunk ------------------------------------------------------------------------------
    table = ChunkTable.open(args.index)
    t = time.perf_counter()
    texts = chunk_texts(args.index, table, np.arange(min(args.limit_chunks or len(table), len(table))))
    detok_s = time.perf_counter() - t
    emb_model = Embedder.load(args.model, device="cuda" if torch.cuda.is_available() else None)
    emb_model.encode(texts[:256])
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    n, dim = len(texts), emb_model.dim
    emb = np.zeros((n, dim), np.float16)
    t = time.perf_counter()
    ids, offsets = emb_model.tokenize(texts)
    tok_s = time.perf_counter() - t
    order, batches = emb_model.plan_batches(np.diff(offsets))
    for lo, hi in batches:
        rows = order[lo:hi]
        emb[rows] = emb_model._forward(ids, offsets, rows).astype(np.float16)
    sync()
    total_s = time.perf_counter() - t
    out["embed"] = {"chunks": n, "documents": int(table.stream.n_docs), "dim": dim, "device": emb_model.device,
                    "batch_tokens": emb_model.batch_tokens, "batches": len(batches), "detokenize_seconds": detok_s,
                    "tokenize_seconds": tok_s, "seconds": total_s, "chunks_per_s": n / total_s,
                    "norm_min": float(np.linalg.norm(emb[:10000].astype(np.float32), axis=1).min())}
    log(f"embedded {n:,} chunks in {total_s:.1f}s ({n / total_s:,.0f} chunks/s, tokenize {tok_s:.1f}s)")
    save()
    del texts, ids, offsets

    # -- real corpora ---------------------------------------------------------------------------------
    q, db = br.held_out(emb, args.queries)
    ref = gpu_exact(db, q, args.k)
    exact = faiss_exact_qps(db, {1: q[: args.exact_queries_1t], all_t: q}, args.k)
    factory = choose_factory(len(db), dim)
    out["real"] = {"n": len(db), "queries": len(q), "threads": threads, "factory_by_size": factory,
                   "exact_qps": {f"{t_}t": v for t_, v in exact.items()}, "sweeps": []}
    log(f"real: {len(db):,} vectors; exact {exact[1]:,.0f} q/s (1t), {exact[all_t]:,.0f} q/s ({all_t}t)")
    save()
    nlist = int(factory[3:].split(",")[0]) if factory.startswith("IVF") else 2048
    steps = args.steps.split(",")
    def real_ivf(fac, rr):
        faiss.omp_set_num_threads(all_t)
        out["real"]["sweeps"].append(br.sweep(db, q, ref, args.k, fac, "nprobe", [4, 8, 16, 32, 64, 128], rr,
                                              exact, log=log, threads=threads, min_seconds=args.min_seconds))
        save()

    if "real_ivf" in steps:
        real_ivf(f"IVF{nlist},SQ8", args.rerank)

    # -- synthetic 5M ---------------------------------------------------------------------------------
    if "synthetic" in steps:
        faiss.omp_set_num_threads(all_t)
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        nq = args.queries
        allv = br.synthetic_vectors(emb, args.n_synthetic + nq, Path(args.scratch) / "synthetic.f16", args.clusters,
                                    device="cuda" if torch.cuda.is_available() else None)
        gen_s = time.perf_counter() - t
        sq, sdb = np.asarray(allv[args.n_synthetic:], dtype=np.float32), np.asarray(allv[: args.n_synthetic])
        sref = gpu_exact(sdb, sq, args.k)
        sexact = faiss_exact_qps(sdb, {1: sq[: max(64, args.exact_queries_1t // 2)], all_t: sq}, args.k)
        out["synthetic"] = {"n": len(sdb), "queries": nq, "threads": threads, "generate_seconds": gen_s,
                            "generator": f"Gaussian mixture fitted to the {n:,} real embeddings ({args.clusters} "
                                         "spherical k-means clusters, real frequencies, per-dimension residual "
                                         "spread), drawn on the GPU",
                            "exact_qps": {f"{t_}t": v for t_, v in sexact.items()}, "sweeps": []}
        log(f"synthetic: {len(sdb):,} in {gen_s:.0f}s; exact {sexact[1]:,.1f} q/s (1t), {sexact[all_t]:,.0f} ({all_t}t)")
        save()
        faiss.omp_set_num_threads(all_t)
        out["synthetic"]["sweeps"].append(br.sweep(sdb, sq, sref, args.k, f"IVF{args.nlist_synthetic},SQ8", "nprobe",
                                                   [1, 2, 4, 8, 16, 32, 64], args.rerank, sexact,
                                                   train_n=args.train_synthetic, log=log, threads=threads,
                                                   min_seconds=args.min_seconds))
        save()
        del sdb, allv

    if "real_hnsw" in steps:
        faiss.omp_set_num_threads(all_t)
        out["real"]["sweeps"].append(br.sweep(db, q, ref, args.k, "HNSW32,Flat", "ef_search", [16, 32, 64, 128, 256],
                                              1, exact, log=log, threads=threads, min_seconds=args.min_seconds))
        save()
    if "real_ivf_flat" in steps:
        real_ivf(f"IVF{nlist},Flat", 1)
    out["seconds"] = time.perf_counter() - t00
    save()
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
