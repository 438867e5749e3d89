"""GPU retrieval bench (H200): the fused Triton scan + top-k kernel against plain torch.topk(q @ db.T, k).

1. correctness: the kernel against a float32 torch.topk reference on random fp16 data (several shapes,
   k values; retrogram.kernels.testing, as tests/kernels/test_kernels_gpu.py checks it);
2. timing: 1M x 384 fp16 database, k=10, batches of 2,000 queries: queries/s of
   torch.topk(q @ db.T, 10) (fp16 scores, the baseline) and of topk_scan, on unit-normalised Gaussian
   vectors and on clustered vectors (a Gaussian mixture: real-embedding-like structure);
3. optional: embedding throughput (chunks/s) of the index embedder on the GPU, when a model directory and
   chunk texts are given (--model DIR --texts FILE.jsonl).
Results: retrieval_gpu_<tag>.json.

    python -m bench.retrieval.gpu_topk [--model DIR --texts FILE.jsonl]
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from bench import common
from bench.common import cuda_event_s
from retrogram.kernels import testing as kt
from retrogram.kernels.topk_scan import topk_scan, topk_scan_fwd_kernel


def make_db(kind: str, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=1).half()
    return kt.clustered_unit_vectors(n, d, gen)


def correctness() -> list[dict]:
    out = []
    for case in kt.TOPK_SCAN_CASES:
        c = kt.check_topk_scan(*case)
        out.append({**c.info, "ok": c.ok})
    return out


def timing(n: int, d: int, batch: int, k: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for kind in ("gaussian", "clustered"):
        db = make_db(kind, n, d, gen)
        q = torch.nn.functional.normalize(db[torch.randint(0, n, (batch,), device="cuda", generator=gen)].float()
                                          + 0.1 * torch.randn(batch, d, device="cuda", generator=gen), dim=1).half()
        t_base = cuda_event_s(lambda: torch.topk(q @ db.T, k, dim=1))
        t_kern = cuda_event_s(lambda: topk_scan(q, db, k))
        bv, bi = torch.topk((q @ db.T).float(), k, dim=1)
        kv, ki = topk_scan(q, db, k)
        rows.append({"data": kind, "n": n, "d": d, "batch": batch, "k": k,
                     "torch_topk_qps": batch / t_base, "topk_scan_qps": batch / t_kern,
                     "speedup": t_base / t_kern, "torch_ms": t_base * 1e3, "kernel_ms": t_kern * 1e3,
                     "recall_vs_torch": (ki[:, :, None] == bi[:, None, :]).any(2).float().mean().item(),
                     "kernel_db_GBps": n * d * 2 / t_kern / 1e9})
        del db
        torch.cuda.empty_cache()
    return rows


def embed_throughput(model_dir: str, texts_path: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    texts = [json.loads(l)["text"] for l in open(texts_path, encoding="utf-8")]
    st = SentenceTransformer(model_dir, device="cuda")
    st.half()
    st.encode(texts[:512], batch_size=256)
    torch.cuda.synchronize()
    t = time.perf_counter()
    st.encode(texts, batch_size=256)
    torch.cuda.synchronize()
    t_st = time.perf_counter() - t
    from retrogram.index.embedder import Embedder

    emb = Embedder.load(model_dir, device="cuda")
    emb.encode(texts[:512])
    torch.cuda.synchronize()
    t = time.perf_counter()
    emb.encode(texts)
    torch.cuda.synchronize()
    t_e = time.perf_counter() - t
    return {"chunks": len(texts), "st_encode_fp16_chunks_per_s": len(texts) / t_st,
            "embedder_chunks_per_s": len(texts) / t_e, "speedup": t_st / t_e}


def main() -> int:
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--model", default=None)
    ap.add_argument("--texts", default=None)
    common.add_output_args(ap)
    args = ap.parse_args()
    if not common.on_gpu():
        ap.error("needs a CUDA GPU with compiled Triton kernels (TRITON_INTERPRET unset or 0)")
    res = {}
    t0 = time.perf_counter()
    res["correctness"] = correctness()
    print(json.dumps(res["correctness"], indent=1), flush=True)
    res["timing"] = timing(args.n, args.d, args.batch, args.k)
    best = getattr(topk_scan_fwd_kernel, "best_config", None)
    res["best_config"] = str(best) if best is not None else None
    print(json.dumps(res["timing"], indent=1), flush=True)
    if args.model and args.texts:
        try:
            res["embedding"] = embed_throughput(args.model, args.texts)
        except Exception as e:  # the search results above still count
            res["embedding"] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res["embedding"], indent=1), flush=True)
    res["seconds"] = time.perf_counter() - t0
    print(f"wrote {common.save('retrieval_gpu', res, out=args.out, tag=args.tag)}")
    return 0 if all(c["ok"] for c in res["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
