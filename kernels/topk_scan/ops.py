"""Fused scan + top-k for exact inner-product search (FAISS GPU's k-selection idea, in Triton).

`topk_scan(q, db, k)` returns the k largest `q @ db.T` per query without writing the [M, N] score matrix:
each program takes BLOCK_M queries and one of SPLITS slices of the database, computes score tiles
[BLOCK_M, BLOCK_N] with tl.dot (fp32 accumulation over BLOCK_D chunks of the dimension), and keeps a
running top-k per query in registers ([BLOCK_M, KP], KP = next power of two >= k). A tile only enters the
selection when some score beats its row's current k-th best (the threshold); then candidates are
inserted one per row per step (replace the row's minimum), min(candidates, k) steps (a runtime trip
count: Triton's scf.while over tensors fails to compile on sm_90), so after the first tiles almost all
work is the scan itself. Each program writes its k best to a [SPLITS, M, KP]
buffer; a final torch.topk over SPLITS * KP candidates per query merges them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import is_interpret, next_pow2


def _configs():
    if is_interpret():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_D": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_D": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=2),
    ]


@triton.autotune(configs=_configs(), key=["D", "KP", "N_PER_SPLIT_BUCKET"])
@triton.jit
def topk_scan_fwd_kernel(
    q_ptr, db_ptr, out_v_ptr, out_i_ptr,
    M, N, D, n_per_split,
    stride_qm, stride_dbn, stride_os, stride_om,
    N_PER_SPLIT_BUCKET,
    K: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, KP)
    offs_bn = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    # running top-k: slots >= K hold +inf so that they are never the row minimum (never replaced)
    top_v = tl.where(offs_k[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KP], tl.float32)
    top_i = tl.zeros([BLOCK_M, KP], tl.int32) - 1
    thr = tl.min(top_v, 1)
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    for start in range(n_lo, n_hi, BLOCK_N):
        offs_n = start + offs_bn
        n_mask = offs_n < n_hi
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            if EVEN_D:
                qm = m_mask[:, None]
                xm = n_mask[None, :]
            else:
                qm = m_mask[:, None] & (dd[None, :] < D)
                xm = n_mask[None, :] & (dd[:, None] < D)
            qt = tl.load(q_ptr + offs_m[:, None] * stride_qm + dd[None, :], mask=qm, other=0.0)
            xt = tl.load(db_ptr + offs_n[None, :] * stride_dbn + dd[:, None], mask=xm, other=0.0)
            s += tl.dot(qt, xt)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # insertion: a row with c scores above its k-th best needs at most min(c, K) steps (candidates are
        # taken in descending order), so the tile needs min(max_row c, K) steps: a runtime trip count, and
        # zero for most tiles once the thresholds have risen
        cnt = tl.sum((s > thr[:, None]).to(tl.int32), 1)
        n_steps = tl.minimum(tl.max(cnt, 0), K)
        for _ in range(0, n_steps):
            best = tl.max(s, 1)
            arg = tl.argmax(s, 1)
            take = best > thr
            slot = tl.argmin(top_v, 1)
            hit = (offs_k[None, :] == slot[:, None]) & take[:, None]
            top_v = tl.where(hit, best[:, None], top_v)
            top_i = tl.where(hit, (start + arg)[:, None], top_i)
            s = tl.where(offs_bn[None, :] == arg[:, None], float("-inf"), s)
            thr = tl.min(top_v, 1)
    out_mask = m_mask[:, None] & (offs_k[None, :] < K)
    o = pid_s * stride_os + offs_m[:, None] * stride_om + offs_k[None, :]
    tl.store(out_v_ptr + o, top_v, mask=out_mask)
    tl.store(out_i_ptr + o, top_i, mask=out_mask)


def topk_scan(q: torch.Tensor, db: torch.Tensor, k: int, splits: int | None = None):
    """Exact top-k inner products: q [M, D], db [N, D] (same dtype: fp16/bf16/fp32, rows contiguous).

    Returns (scores float32 [M, k] in descending order, ids int64 [M, k]). `splits` slices the database
    across programs (default: enough programs to fill the GPU)."""
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ValueError(f"q [M, D] and db [N, D] expected, got {list(q.shape)} and {list(db.shape)}")
    if q.dtype != db.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q and db must share a float dtype (fp16, bf16, fp32), got {q.dtype} and {db.dtype}")
    if q.device != db.device:
        raise ValueError("q and db must be on the same device")
    M, D = q.shape
    N = db.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(N, 256):
        raise ValueError(f"k={k!r}: expected 1 <= k <= min(N={N}, 256)")
    if D < 16:
        raise ValueError(f"D={D}: expected at least 16")
    q = q.contiguous() if q.stride(1) != 1 else q
    db = db.contiguous() if db.stride(1) != 1 else db
    KP = max(16, next_pow2(k))
    if splits is None:
        if is_interpret() or q.device.type != "cuda":
            splits = 2
        else:
            # programs = a multiple of the SM count (4 waves at BLOCK_M=128, 2 at 256, 8 at 64), so that no
            # last wave runs nearly empty (272 programs on 132 SMs took 3 waves for 2.06 waves of work)
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            m_blocks = triton.cdiv(M, 128)
            splits = max(1, min(triton.cdiv(N, 4096), round(4 * sms / m_blocks)))
    n_per_split = triton.cdiv(triton.cdiv(N, splits), 256) * 256
    splits = triton.cdiv(N, n_per_split)
    out_v = torch.full((splits, M, KP), float("-inf"), device=q.device, dtype=torch.float32)
    out_i = torch.full((splits, M, KP), -1, device=q.device, dtype=torch.int32)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), splits)

    topk_scan_fwd_kernel[grid](
        q, db, out_v, out_i, M, N, D, n_per_split,
        q.stride(0), db.stride(0), out_v.stride(0), out_v.stride(1),
        next_pow2(n_per_split),
        K=k, KP=KP, EVEN_D=(D % 128 == 0),
    )
    cand_v = out_v.permute(1, 0, 2).reshape(M, splits * KP)
    cand_i = out_i.permute(1, 0, 2).reshape(M, splits * KP)
    vals, pos = torch.topk(cand_v, k, dim=1)
    return vals, torch.gather(cand_i, 1, pos).long()
