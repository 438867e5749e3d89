"""GPU IVF for indexes larger than GPU memory (`TorchIVFSearcher`): vectors in pinned HOST memory, streamed
to the GPU in chunks of a `max_gpu_bytes` budget far below the data size; q/s and recall@10 vs exact.

Synthetic 384-d fp16 unit vectors from a Gaussian mixture (real-embedding-like clusters), generated on the
GPU, copied to pinned host memory; coarse centroids from a few k-means iterations in torch on a sample
(no faiss needed); ground truth = exact top-10 on the GPU (the data fits the H200 only for this check).

    python -m bench.retrieval.gpu_ivf --n 20000000 --nlist 32768
Results: retrieval_gpu_ivf_<tag>.json (written after each step).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench import common
from retrogram.index.search.torch_ivf import TorchIVFSearcher


def main():
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--n", type=int, default=20_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--nlist", type=int, default=32768)
    ap.add_argument("--components", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--nprobe", default="8,16,32,64")
    ap.add_argument("--max-gpu-gib", type=float, default=2.0)
    ap.add_argument("--kmeans-sample", type=int, default=1 << 20)
    ap.add_argument("--kmeans-iters", type=int, default=6)
    common.add_output_args(ap)
    a = ap.parse_args()
    dev = "cuda"
    res = {"n": a.n, "dim": a.dim, "nlist": a.nlist, "batch": a.batch, "queries": a.queries, "k": 10,
           "max_gpu_bytes": int(a.max_gpu_gib * (1 << 30)), "data_bytes": a.n * a.dim * 2}

    def save():
        common.save("retrieval_gpu_ivf", res, out=a.out, tag=a.tag)

    t0 = time.perf_counter()
    g = torch.Generator(device=dev).manual_seed(0)
    centers = torch.randn(a.components, a.dim, device=dev, generator=g)
    centers /= centers.norm(dim=1, keepdim=True)

    def draw(m):
        c = torch.randint(0, a.components, (m,), device=dev, generator=g)
        x = centers[c] + 0.08 * torch.randn(m, a.dim, device=dev, generator=g)
        return (x / x.norm(dim=1, keepdim=True)).half()

    db = torch.empty(a.n, a.dim, dtype=torch.float16, device=dev)
    for lo in range(0, a.n, 1 << 21):
        db[lo: lo + (1 << 21)] = draw(min(1 << 21, a.n - lo))
    q = draw(a.queries)
    res["gen_s"] = time.perf_counter() - t0
    # k-means (spherical) on a sample
    t0 = time.perf_counter()
    samp = db[torch.randint(0, a.n, (a.kmeans_sample,), device=dev, generator=g)]
    cent = samp[torch.randperm(a.kmeans_sample, device=dev, generator=g)[: a.nlist]].float()
    for _ in range(a.kmeans_iters):
        asg = torch.cat([(samp[lo: lo + 65536] @ cent.half().T).argmax(1) for lo in range(0, len(samp), 65536)])
        s = torch.zeros_like(cent).index_add_(0, asg, samp.float())
        cnt = torch.bincount(asg, minlength=a.nlist)
        cent = torch.where((cnt > 0)[:, None], s, cent)
        cent /= cent.norm(dim=1, keepdim=True)
    ch = cent.half()
    assign = torch.cat([(db[lo: lo + 65536] @ ch.T).argmax(1) for lo in range(0, a.n, 65536)])
    perm = torch.argsort(assign, stable=True)
    offsets = np.concatenate([[0], np.cumsum(torch.bincount(assign, minlength=a.nlist).cpu().numpy())])
    res["kmeans_assign_s"] = time.perf_counter() - t0
    res["list_size_max"] = int(np.diff(offsets).max())
    # ground truth on the GPU (exact, whole data resident for this check only)
    t0 = time.perf_counter()
    gt = []
    for lo in range(0, a.queries, 256):
        best_s = torch.full((min(256, a.queries - lo), 10), float("-inf"), device=dev)
        best_i = torch.full_like(best_s, -1, dtype=torch.int64)
        for c0 in range(0, a.n, 1 << 22):
            s_ = (q[lo: lo + 256] @ db[c0: c0 + (1 << 22)].T).float()
            ts, ti = torch.topk(s_, 10, dim=1)
            cs, ci = torch.cat([best_s, ts], 1), torch.cat([best_i, ti + c0], 1)
            best_s, p = torch.topk(cs, 10, dim=1)
            best_i = torch.gather(ci, 1, p)
        gt.append(best_i.cpu().numpy())
    gt = np.concatenate(gt)
    res["ground_truth_s"] = time.perf_counter() - t0
    # packed copy in pinned host memory, then free the GPU copy
    t0 = time.perf_counter()
    host = torch.empty(a.n, a.dim, dtype=torch.float16, pin_memory=True)
    for lo in range(0, a.n, 1 << 22):
        host[lo: lo + (1 << 22)].copy_(db[perm[lo: lo + (1 << 22)]])
    ids = perm.cpu()
    del db, samp
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    res["pack_to_host_s"] = time.perf_counter() - t0
    save()
    print({k_: v for k_, v in res.items()}, flush=True)
    ts = TorchIVFSearcher(host, ids, offsets, cent.cpu().numpy(), nprobe=1, device=dev,
                          max_gpu_bytes=res["max_gpu_bytes"])
    qn = q.float().cpu().numpy()
    res["chunk_rows"] = ts.chunk_rows
    res["curve"] = []
    nprobes = [int(x) for x in a.nprobe.split(",")]
    for npb in nprobes:
        ts.search(qn[: a.batch], 10, nprobe=npb)   # warm-up
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids_out = np.concatenate([ts.search(qn[lo: lo + a.batch], 10, nprobe=npb).ids
                                  for lo in range(0, a.queries, a.batch)])
        dt = time.perf_counter() - t0
        rec = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ids_out, gt)]))
        row = {"nprobe": npb, "recall_at_10": rec, "qps": a.queries / dt,
               "peak_gpu_bytes": int(torch.cuda.max_memory_allocated())}
        res["curve"].append(row)
        print(row, flush=True)
        save()
    # exact streaming (nprobe = nlist: every list streamed from host memory)
    t0 = time.perf_counter()
    r = ts.search(qn[: a.batch], 10, nprobe=a.nlist)
    dt = time.perf_counter() - t0
    rec = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(r.ids, gt[: a.batch])]))
    res["exact_streaming"] = {"nprobe": a.nlist, "recall_at_10": rec, "qps": a.batch / dt,
                              "host_to_gpu_GBps": a.n * a.dim * 2 / dt / 1e9}
    print(res["exact_streaming"], flush=True)
    save()


if __name__ == "__main__":
    main()
