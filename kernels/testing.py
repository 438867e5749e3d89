"""What kernel checks share, in tests/ and in bench/: the device and dtype they run in, fresh random inputs,
NaN-poisoned outputs, shuffled paged caches and the relative error against a float64 reference; and the GPU
checks (bf16 at sizes that reach every launch path) of each kernel against its reference, which
tests/kernels/test_kernels_gpu.py runs under the `gpu` marker and bench.kernels records beside its timings.

Imports torch, triton and the kernels only. On a CPU the kernels run in Triton's interpreter (float32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton

from .block_sparse import (block_sparse_attention, block_sparse_attention_naive, sampled_block_mass,
                           sampled_block_mass_naive, topp_block_list, topp_block_list_naive)
from .block_sparse_prefill import (block_sparse_prefill, mass_vertical_slash_scores, mass_vertical_slash_scores_naive,
                                   vertical_slash_blocks, vs_pattern)
from .cca_attention import cca_attention, cca_attention_naive
from .flash_decode import flash_decode, flash_decode_naive
from .flash_prefill import flash_prefill, flash_prefill_naive
from .hip_attention import (hip_attention_prefill, hip_block_list, hip_decode, hip_decode_naive, hip_decode_select,
                            hip_select, prefill_kend)
from .topk_scan import topk_scan, topk_scan_naive

# The CPU tests: the interpreter computes bf16 wrongly, so float32 there (and on CUDA with TRITON_INTERPRET=0)
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"
DTYPE = torch.float32
TOL = 1e-4
# The GPU checks: bf16 inputs against a float64 reference
GPU_DTYPE = torch.bfloat16
GPU_TOL = 1e-2


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN when out holds a NaN (an unwritten, poisoned element)."""
    out = out.double()
    if torch.isnan(out).any():
        return float("nan")
    return ((out - ref.to(out.device)).norm() / ref.norm().clamp(min=1e-30)).item()


def rnd(*shape, device=None, dtype=None) -> torch.Tensor:
    return torch.randn(*shape, device=device or DEV, dtype=dtype or DTYPE)


def poisoned(like: torch.Tensor) -> torch.Tensor:
    """An output buffer of NaN: an element the kernel does not write shows up in rel()."""
    return torch.full(like.shape, float("nan"), device=like.device, dtype=like.dtype)


def to_paged(k: torch.Tensor, v: torch.Tensor, page: int):
    """Contiguous [B, S, H, D] caches scattered into shuffled pages (the pad past S is NaN: reading it
    poisons the result). Returns the K and V pages [B * npg, page, H, D] and the block table [B, npg]."""
    B, S, H, D = k.shape
    npg = triton.cdiv(S, page)
    perm = torch.randperm(B * npg, device=k.device).view(B, npg).to(torch.int32)
    pad = npg * page - S
    kp = torch.full((B * npg, page, H, D), float("nan"), device=k.device, dtype=k.dtype)
    vp = torch.full_like(kp, float("nan"))
    kp[perm.flatten().long()] = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(B * npg, page, H, D)
    vp[perm.flatten().long()] = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(B * npg, page, H, D)
    return kp, vp, perm


# ------------------------------------------------------------------------------------------------------
# GPU checks. Each takes its case's parameters, device and dtype (a CPU smoke run passes "cpu", float32)
# and f, which divides the sequence lengths (smoke runs), and returns a Check.
@dataclass
class Check:
    kernel: str
    err: float          # relative error, unless info says otherwise
    tol: float
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.err == self.err and self.err < self.tol

    def record(self) -> dict:
        return {"kernel": self.kernel, "rel_err": self.err, "tol": self.tol, "ok": self.ok, **self.info}


# (B, T, S, HQ, HKV, D, causal): GQA, head dims 64/128/256, a cache longer than the queries, non-causal
FLASH_PREFILL_CASES = [(2, 1000, 1000, 8, 8, 128, True), (1, 777, 1500, 8, 2, 64, True),
                       (2, 513, 513, 4, 4, 256, True), (1, 600, 700, 6, 2, 128, False)]


def check_flash_prefill(B, T, S, HQ, HKV, D, causal, *, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    torch.manual_seed(seed)
    T, S = T // f, S // f
    q, k, v = rnd(B, T, HQ, D, device=device, dtype=dtype), rnd(B, S, HKV, D, device=device, dtype=dtype), \
        rnd(B, S, HKV, D, device=device, dtype=dtype)
    o = poisoned(q)
    flash_prefill(q, k, v, causal=causal, out=o)
    ref, _ = flash_prefill_naive(q.double(), k.double(), v.double(), causal=causal)
    return Check("flash_prefill", rel(o, ref), GPU_TOL, {"shape": [B, T, S, HQ, HKV, D], "causal": causal})


def check_flash_prefill_varlen(*, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    """Four sequences of 100, 800, 1 and 599 tokens packed in one batch row."""
    torch.manual_seed(seed)
    cu = torch.tensor([0, 100, 900, 901, 1500], device=device, dtype=torch.int32) // f
    n = 1500 // f
    q, k, v = rnd(1, n, 8, 128, device=device, dtype=dtype), rnd(1, n, 2, 128, device=device, dtype=dtype), \
        rnd(1, n, 2, 128, device=device, dtype=dtype)
    o = poisoned(q)
    flash_prefill(q, k, v, causal=True, cu_seqlens=cu, out=o)
    ref, _ = flash_prefill_naive(q.double(), k.double(), v.double(), causal=True, cu_seqlens=cu)
    return Check("flash_prefill varlen", rel(o, ref), GPU_TOL, {"cu_seqlens": cu.tolist()})


# (B, TQ, HQ, HKV, S, page, waves): contiguous and paged, GQA 4, MHA, 4 query tokens, long caches; waves
# other than the default give other split counts per (batch, KV head)
FLASH_DECODE_CASES = [(3, 1, 32, 8, 5000, None, None), (3, 1, 32, 8, 5000, None, 1), (3, 1, 32, 8, 5000, None, 3),
                      (3, 1, 32, 8, 5000, 64, None), (3, 1, 32, 8, 5000, 64, 1), (3, 1, 32, 8, 5000, 64, 3),
                      (2, 4, 8, 2, 3001, 256, None), (1, 1, 32, 32, 20000, None, None),
                      (1, 1, 32, 8, 40000, None, None), (1, 1, 32, 8, 40000, 256, None)]


def check_flash_decode(B, TQ, HQ, HKV, S, page, waves, *, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    torch.manual_seed(seed)
    S = S // f
    q = rnd(B, TQ, HQ, 128, device=device, dtype=dtype)
    seqlens = torch.randint(TQ, S + 1, (B,), device=device, dtype=torch.int32)
    k, v = rnd(B, S, HKV, 128, device=device, dtype=dtype), rnd(B, S, HKV, 128, device=device, dtype=dtype)
    ref = flash_decode_naive(q.double(), k.double(), v.double(), seqlens)
    o = poisoned(q)
    kw = {} if waves is None else {"waves": waves}
    if page is None:
        flash_decode(q, k, v, seqlens=seqlens, out=o, **kw)
    else:
        kp, vp, table = to_paged(k, v, page)
        flash_decode(q, kp, vp, seqlens=seqlens, block_table=table, out=o, **kw)
    info = {"shape": [B, TQ, HQ, HKV, S], "page": page}
    if waves is not None:
        info["waves"] = waves
    return Check("flash_decode", rel(o, ref), GPU_TOL, info)


# (B, HQ, HKV, S, page): the fused decode selection picks exactly the multi-launch hip_select's blocks
HIP_DECODE_SELECT_CASES = [(2, 32, 8, 70000, None), (2, 32, 8, 70000, 256), (1, 32, 32, 50000, None)]


def check_hip_decode_select(B, HQ, HKV, S, page, *, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    torch.manual_seed(seed)
    S = S // f
    q, k = rnd(B, 1, HQ, 128, device=device, dtype=dtype), rnd(B, S, HKV, 128, device=device, dtype=dtype)
    seqlens = torch.randint(S // 2, S + 1, (B,), device=device, dtype=torch.int32)
    table, kc = None, k
    if page is not None:
        kc, _, table = to_paged(k, k, page)
    sel = hip_decode_select(q, kc, seqlens, S, block_table=table)
    old = hip_select(q, kc, seqlens.long()[:, None], S, 1, 64, 32, 1, 4, group_heads=True, block_table=table)[:, :, 0]
    diff = (sel != old).float().mean().item()
    # ties between bf16 scores could order differently; none expected on random data
    return Check("hip_decode_select", diff, 1e-3, {"vs": "hip_select (multi-launch)", "shape": [B, 1, HQ, HKV, S],
                                                   "page": page, "blocks_differing": diff})


def check_hip_decode_paged(*, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    torch.manual_seed(seed)
    B, S = 2, 9000 // f
    q = rnd(B, 1, 32, 128, device=device, dtype=dtype)
    k, v = rnd(B, S, 8, 128, device=device, dtype=dtype), rnd(B, S, 8, 128, device=device, dtype=dtype)
    seqlens = torch.tensor([9000 // f, 7777 // f], device=device, dtype=torch.int32)
    kp, vp, table = to_paged(k, v, 128)
    sel = hip_decode_select(q, kp, seqlens, S, topk=16, block_table=table)
    o = poisoned(q)
    hip_decode(q, kp, vp, sel, seqlens, table, out=o)
    ref = hip_decode_naive(q.double(), k.double(), v.double(), sel.cpu(), seqlens)
    return Check("hip_decode (paged)", rel(o, ref), GPU_TOL, {"shape": [B, 1, 32, 8, S]})


def _prefill_qkv(T, HQ, HKV, D, device, dtype):
    return (rnd(1, T, HQ, D, device=device, dtype=dtype), rnd(1, T, HKV, D, device=device, dtype=dtype),
            rnd(1, T, HKV, D, device=device, dtype=dtype))


def check_hip_prefill(*, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    """The block-sparse core on the hierarchical top-k ("rep") selection's block lists."""
    torch.manual_seed(seed)
    T = 4096 // f
    q, k, v = _prefill_qkv(T, 8, 2, 128, device, dtype)
    kend = prefill_kend(T, T, 64, True, device)
    sel = hip_select(q, k, kend, T, topk=8, n_sink=1, n_local=4)
    bi, bc = hip_block_list(sel, kend, 64, 1, 4)
    o = poisoned(q)
    block_sparse_attention(q, k, v, bi, bc, 64, 64, out=o)
    ref = block_sparse_attention_naive(q.double(), k.double(), v.double(), bi, bc, 64, 64)
    return Check("hip_prefill (block-sparse)", rel(o, ref), GPU_TOL,
                 {"shape": [1, T, 8, 2, 128], "blocks_mean": bc.float().mean().item()})


# (T, top_p, n_local): HiP prefill with the sampled-mass estimator, end to end, against the core's reference
HIP_PREFILL_MASS_CASES = [(3000, 0.9, 2), (4096, 0.9, 2)]


def check_hip_prefill_mass(T, top_p, n_local, *, H=8, D=128, f=1, device="cuda", dtype=GPU_DTYPE, seed=1) -> Check:
    torch.manual_seed(seed)
    T = T // f
    q, k, v = _prefill_qkv(T, H, 2, D, device, dtype)
    o, (bi, bc) = hip_attention_prefill(q, k, v, dense_below=0, estimator="mass", top_p=top_p, n_local=n_local,
                                        return_blocks=True, out=poisoned(q))
    ref = block_sparse_attention_naive(q.double(), k.double(), v.double(), bi, bc, 64, 64)
    return Check("hip_prefill mass", rel(o, ref), GPU_TOL, {"T": T, "blocks_mean": bc.float().mean().item()})


def check_vs_prefill(*, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    """The block-sparse core on vertical-slash block lists (mass estimator, top-p 0.9)."""
    torch.manual_seed(seed)
    T = 4096 // f
    q, k, v = _prefill_qkv(T, 8, 2, 128, device, dtype)
    bi, bc = vertical_slash_blocks(q, k, n_vertical=8, n_slash=8, top_p=0.9)
    o = poisoned(q)
    block_sparse_attention(q, k, v, bi, bc, 64, 64, out=o)
    ref = block_sparse_attention_naive(q.double(), k.double(), v.double(), bi, bc, 64, 64)
    return Check("vs_prefill (block-sparse)", rel(o, ref), GPU_TOL, {"blocks_mean": bc.float().mean().item()})


def check_block_sparse_prefill(*, H=8, D=128, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    """block_sparse_prefill end to end (its default vertical-slash mass selection)."""
    torch.manual_seed(seed)
    T = 3000 // f
    q, k, v = _prefill_qkv(T, H, 2, D, device, dtype)
    o, (bi, bc) = block_sparse_prefill(q, k, v, dense_below=0, return_blocks=True, out=poisoned(q))
    ref = block_sparse_attention_naive(q.double(), k.double(), v.double(), bi, bc, 64, 64)
    return Check("block_sparse_prefill (vs mass)", rel(o, ref), GPU_TOL, {"mean_blocks": bc.float().mean().item()})


def check_cca(*, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    torch.manual_seed(seed)
    q = rnd(2, 1000 // f, 8, 128, device=device, dtype=dtype)
    kk, vv = rnd(2, 16, 256 // f, 2, 128, device=device, dtype=dtype), rnd(2, 16, 256 // f, 2, 128, device=device,
                                                                            dtype=dtype)
    o = cca_attention(q, kk, vv, 64, out=poisoned(q))
    return Check("cca_attention", rel(o, cca_attention_naive(q.double(), kk.double(), vv.double(), 64)), GPU_TOL)


# The selection kernels: H query heads over 2 KV heads (T in SMALL_T), or HQ heads over HQ (T in BIG_T); the
# first query heads are scaled up for peaked attention.
MASS_SMALL_T = (2000, 4096)
MASS_BIG_T = (32768, 131072)


def _mass(T, H, HKV, D, device, dtype, peaked):
    q, k = rnd(1, T, H, D, device=device, dtype=dtype), rnd(1, T, HKV, D, device=device, dtype=dtype)
    q[..., :peaked, :] *= 4
    return q, k


def check_sampled_block_mass(T, *, H=8, D=128, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    """Max abs error of the block mass (bf16 q/k, float32 mass) against the float64 reference."""
    torch.manual_seed(seed)
    T = T // f
    q, k = _mass(T, H, 2, D, device, dtype, 4)
    m = sampled_block_mass(q, k, 64, 64, 4)
    err = (m.double().cpu() - sampled_block_mass_naive(q, k, 64, 64, 4)).abs().max().item()
    return Check("sampled_block_mass", err, 1e-4, {"T": T, "note": "max abs error of block mass"})


def check_mass_vertical_slash_scores(T, *, H=8, D=128, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    torch.manual_seed(seed)
    T = T // f
    q, k = _mass(T, H, 2, D, device, dtype, 4)
    m = sampled_block_mass(q, k, 64, 64, 4)
    vert, slash = mass_vertical_slash_scores(m, T, T, 64, 64)
    rv, rs = mass_vertical_slash_scores_naive(m, T, T, 64, 64)
    err = max((vert.double().cpu() - rv).abs().max().item(), (slash.double().cpu() - rs).abs().max().item())
    return Check("mass_vertical_slash_scores", err, 1e-5, {"T": T, "note": "max abs error"})


TOPP_VARIANTS = ("hip top-p", "vs top-p + pattern", "hip top-p cap 64")


def check_topp_block_list(T, variant, *, HQ=32, D=128, f=1, device="cuda", dtype=GPU_DTYPE, seed=0) -> Check:
    """The fraction of (head, query block) rows whose top-p block list differs from the sort-based
    reference (ties at the cut only, from float32 summation order)."""
    torch.manual_seed(seed)
    T = T // f
    q, k = _mass(T, HQ, HQ, D, device, dtype, 8)
    m = sampled_block_mass(q, k, 64, 64, 4)
    kend = prefill_kend(T, T, 64, True, device)
    args, kw = (1, 4), {}
    if variant == "vs top-p + pattern":
        vert, slash = mass_vertical_slash_scores(m, T, T, 64, 64)
        args, kw = (1, 2), {"extra_idx": vs_pattern(vert, slash, T, T, 64, 64, 32, 16, 1, 2)}
    elif variant == "hip top-p cap 64":
        kw = {"max_blocks": 64}
    bi, bc = topp_block_list(m, kend, 64, 0.95, *args, **kw)
    ri, rc = topp_block_list_naive(m, kend, 64, 0.95, *args, **kw)
    w = min(bi.shape[-1], ri.shape[-1])
    slot = torch.arange(w, device=bi.device)
    diff = (bc != rc) | ((bi[..., :w] != ri[..., :w]) & (slot < rc[..., None])).any(-1)
    frac = diff.float().mean().item()
    return Check(f"topp_block_list {variant}", frac, 1e-3,
                 {"T": T, "rows": int(bc.numel()), "rows_differ": int(diff.sum()),
                  "mean_blocks": bc.float().mean().item(), "mean_blocks_ref": rc.float().mean().item(),
                  "max_count_diff": int((bc - rc).abs().max())})


# (M queries, N database rows, dim, k): fp16 scan + top-k against a float32 torch.topk
TOPK_SCAN_CASES = [(1, 1000, 384, 10), (300, 50_000, 384, 10), (2000, 200_000, 384, 10), (64, 70_001, 128, 1),
                   (130, 30_000, 384, 100), (17, 5000, 96, 32)]


def clustered_unit_vectors(n, d, gen, device="cuda") -> torch.Tensor:
    """n fp16 unit vectors around 4,096 random unit centres (spread 0.5): clustered like sentence embeddings."""
    c = torch.nn.functional.normalize(torch.randn(4096, d, device=device, generator=gen), dim=1)
    lab = torch.randint(0, 4096, (n,), device=device, generator=gen)
    x = c[lab] + 0.5 / d ** 0.5 * torch.randn(n, d, device=device, generator=gen)
    return torch.nn.functional.normalize(x, dim=1).half()


def check_topk_scan(m, n, d, k, *, device="cuda", seed=0) -> Check:
    """Max abs error of the top-k scores; ids may differ only at float32 ties of different summation orders,
    so the ids' recomputed scores must equal the reported ones."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(m, d, device=device, generator=gen), dim=1).half()
    db = clustered_unit_vectors(n, d, gen, device)
    v, i = topk_scan(q, db, k)
    rv, ri = topk_scan_naive(q, db, k)
    got = (q.float() @ db.float().T).gather(1, i)
    recomputed = (got - v).abs().max().item()
    err = max((v - rv).abs().max().item(), recomputed)
    return Check("topk_scan", err, 1e-3, {"m": m, "n": n, "d": d, "k": k, "ids_equal_frac": (i == ri).float().mean().item(),
                                          "max_abs_err_scores": (v - rv).abs().max().item(),
                                          "recomputed_err": recomputed})


def attention_checks(f=1, device="cuda", dtype=GPU_DTYPE) -> list[Check]:
    """Every attention kernel's GPU check, in the order bench.kernels.attention records them."""
    out = [check_flash_prefill(*c, f=f, device=device, dtype=dtype) for c in FLASH_PREFILL_CASES]
    out.append(check_flash_prefill_varlen(f=f, device=device, dtype=dtype))
    out += decode_checks(f, device, dtype)
    out.append(check_hip_prefill(f=f, device=device, dtype=dtype))
    out.append(check_vs_prefill(f=f, device=device, dtype=dtype))
    out.append(check_cca(f=f, device=device, dtype=dtype))
    return out


def decode_checks(f=1, device="cuda", dtype=GPU_DTYPE) -> list[Check]:
    """flash_decode, the fused HiP decode selection and hip_decode."""
    out = [check_flash_decode(*c, f=f, device=device, dtype=dtype) for c in FLASH_DECODE_CASES]
    out += [check_hip_decode_select(*c, f=f, device=device, dtype=dtype) for c in HIP_DECODE_SELECT_CASES]
    out.append(check_hip_decode_paged(f=f, device=device, dtype=dtype))
    return out


def selection_checks(small=MASS_SMALL_T, big=MASS_BIG_T, f=1, device="cuda", dtype=GPU_DTYPE, H=8, HQ=32,
                     D=128) -> list[Check]:
    """The sparse-prefill selection kernels against their references, then the attention on their lists
    (H query heads over 2 KV heads; HQ heads for the top-p lists at the lengths in big)."""
    out = []
    for T in small:
        out.append(check_sampled_block_mass(T, H=H, D=D, f=f, device=device, dtype=dtype))
        out.append(check_mass_vertical_slash_scores(T, H=H, D=D, f=f, device=device, dtype=dtype))
    for T in big:
        out += [check_topp_block_list(T, v, HQ=HQ, D=D, f=f, device=device, dtype=dtype) for v in TOPP_VARIANTS]
    out += [check_hip_prefill_mass(*c, H=H, D=D, f=f, device=device, dtype=dtype) for c in HIP_PREFILL_MASS_CASES]
    out.append(check_block_sparse_prefill(H=H, D=D, f=f, device=device, dtype=dtype))
    return out
