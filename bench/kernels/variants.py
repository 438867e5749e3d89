"""Variants tried against the kernels' current code on the H200, each checked against it, timed side by side.

1. Decode at GQA 32/8, batch 1, 32k (134 MB of K/V): a pure streaming read of the same cache at several
   grids (the bandwidth ceiling at this size), flash_decode, and flash_decode's loop with its parts switched
   off (no softmax/dots, no in-kernel combine, combine tile widths): where the time over the read goes.
2. The HiP estimator (sampled_block_mass) at 128k, 128-row query blocks, held to each of a list of launch
   configurations (rows per program, KPT key blocks per tile, warps, stages). (Its variant with KPT and one
   FMA for scale and shift, tried here first as a copy, is now the kernel.)
3. The block-sparse core at 128k, density 0.253: the kernel held to launch configurations with its K/V
   tiles by pointers and by TMA, and a copy taking two key blocks per iteration (optionally with Triton's
   automatic warp specialization). (The first runs timed a one-loop copy of the core with TMA, before
   TMA went into the kernel: `kernels_variants_h200.log`.)
4. flash_prefill with its K/V tiles by TMA and by pointers, beside SDPA, at 16k and 64k.
Prints a table per section; results kernels_variants_<tag>.json, where each section run replaces that
section only (each keeps the stamp of its run).

    python -m bench.kernels.variants [--sections read est core flash]     # on the GPU
    TRITON_INTERPRET=1 python -m bench.kernels.variants --smoke           # CPU (tiny sizes, no TMA variants)
"""

from __future__ import annotations

import contextlib
import time

import torch
import triton
import triton.language as tl

from bench import common
from bench.common import gpu_ms, layers_ms, log
from bench.kernels.inputs import density_lists, prefill_flops, sdpa_flash
from retrogram.kernels import testing as kt
from retrogram.kernels.block_sparse import block_sparse_attention, sampled_block_mass
from retrogram.kernels.block_sparse import ops as bso
from retrogram.kernels.flash_decode import flash_decode
from retrogram.kernels.utils import LOG2E, is_interpret

DEV = "cuda" if common.on_gpu() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
INTERP = is_interpret()
# per section run: its rows and its checks (each variant against the current code)
R: dict = {}
SECTION = ""   # the section running


def rnd(*shape):
    return kt.rnd(*shape, device=DEV, dtype=DTYPE)


# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def held_to(tuner, config):
    """An autotuned kernel held to one configuration for the duration."""
    saved_configs, saved_cache = tuner.configs, dict(tuner.cache)
    tuner.configs = [config]
    tuner.cache.clear()
    try:
        yield
    finally:
        tuner.configs = saved_configs
        tuner.cache.clear()
        tuner.cache.update(saved_cache)


# ------------------------------------------------------------------------------------------------
# block-sparse core variant: two listed key blocks per iteration
@triton.jit
def core2_fwd_kernel(
    q, k, v, o, block_idx, block_cnt, T_q, T_k, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_ih, stride_iq, stride_ch,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr,
):
    """TMA K/V, two listed key blocks per iteration (one rescale of the accumulator per 128 keys)."""
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_h = tl.program_id(1)
    i_hk = i_h // G
    m0 = i_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_nb = tl.arange(0, BLOCK_N)
    qb = tl.load(q + i_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=(offs_m < T_q)[:, None],
                 other=0.0)
    k_desc = tl.make_tensor_descriptor(k + i_hk * stride_kh, shape=[T_k, D], strides=[stride_kt, 1],
                                       block_shape=[BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(v + i_hk * stride_vh, shape=[T_k, D], strides=[stride_vt, 1],
                                       block_shape=[BLOCK_N, D])
    offs_qpos = offs_m + (T_k - T_q)
    idx_base = block_idx + i_h * stride_ih + i_m * stride_iq
    cnt = tl.load(block_cnt + i_h * stride_ch + i_m)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for j in tl.range(0, cnt, 2, warp_specialize=WS):
        kb1 = tl.load(idx_base + j)
        has2 = j + 1 < cnt
        kb2 = tl.load(idx_base + j + 1, mask=has2, other=0)
        kb2 = tl.where(has2, kb2, kb1)
        n1 = kb1 * BLOCK_N + offs_nb
        n2 = kb2 * BLOCK_N + offs_nb
        k1 = k_desc.load([kb1 * BLOCK_N, 0])
        k2 = k_desc.load([kb2 * BLOCK_N, 0])
        s1 = tl.dot(qb, tl.trans(k1))
        s2 = tl.dot(qb, tl.trans(k2))
        s1 = tl.where((n1[None, :] <= offs_qpos[:, None]) & (n1 < T_k)[None, :], s1, float("-inf"))
        s2 = tl.where((n2[None, :] <= offs_qpos[:, None]) & (n2 < T_k)[None, :] & has2, s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.maximum(tl.max(s1, 1), tl.max(s2, 1)) * qk_scale)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p1 = tl.math.exp2(s1 * qk_scale - m_sub[:, None])
        p2 = tl.math.exp2(s2 * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p1, 1) + tl.sum(p2, 1)
        acc = acc * alpha[:, None]
        v1 = v_desc.load([kb1 * BLOCK_N, 0])
        acc = tl.dot(p1.to(v1.dtype), v1, acc)
        v2 = v_desc.load([kb2 * BLOCK_N, 0])
        acc = tl.dot(p2.to(v2.dtype), v2, acc)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(o + i_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], (acc / l_safe[:, None]).to(o.dtype.element_ty),
             mask=(offs_m < T_q)[:, None])


def core2(q, k, v, bi, bc, bq, bn, ws, num_warps, num_stages, out):
    _, T, HQ, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    core2_fwd_kernel[(triton.cdiv(T, bq), HQ)](
        q, k, v, out, bi, bc, T, S, D ** -0.5 * LOG2E,
        q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2), out.stride(1), out.stride(2),
        bi.stride(1), bi.stride(2), bc.stride(1),
        HQ=HQ, G=HQ // HKV, D=D, BLOCK_M=bq, BLOCK_N=bn, WS=ws, num_warps=num_warps, num_stages=num_stages)
    return out


# ------------------------------------------------------------------------------------------------
# decode read ceiling: stream K and V of one layer's cache, nothing else
@triton.jit
def read_fwd_kernel(k, v, out, tokens_per_prog, S, stride_t, HKV: tl.constexpr, D: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    i_h = tl.program_id(0)
    i_s = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    t0 = i_s * tokens_per_prog
    t1 = tl.minimum(t0 + tokens_per_prog, S)
    for t in range(t0, t1, BLOCK_N):
        off = (t + offs_n)[:, None].to(tl.int64) * stride_t + i_h * D + offs_d[None, :]
        msk = (t + offs_n < t1)[:, None]
        acc += tl.load(k + off, mask=msk, other=0.0).to(tl.float32) + tl.load(v + off, mask=msk, other=0.0).to(tl.float32)
    tl.store(out + i_h * tl.num_programs(1) + i_s, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def dec_v_fwd_kernel(q, k, v, o, o_part, lse_part, counter, S, qk_scale, blocks_per_split, num_splits,
                     stride_kt, stride_qh, G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                     COMPUTE: tl.constexpr, COMBINE: tl.constexpr, LAT: tl.constexpr):
    """flash_decode's contiguous T_Q=1 path with parts switched off: COMPUTE=False streams K/V into a sum
    (no dots, no softmax); COMBINE=False leaves the partials."""
    i_hk = tl.program_id(0)
    i_s = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    offs_nb = tl.arange(0, BLOCK_N)
    row_ok = offs_r < G
    qt = tl.load(q + (i_hk * G + offs_r)[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    nkb = tl.cdiv(S, BLOCK_N)
    j_start = i_s * blocks_per_split
    j_end = tl.minimum(j_start + blocks_per_split, nkb)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for j in range(j_start, j_end):
        offs_n = j * BLOCK_N + offs_nb
        kmask = offs_n < S
        off = offs_n.to(tl.int64)[:, None] * stride_kt + i_hk * D + offs_d[None, :]
        kk = tl.load(k + off, mask=kmask[:, None], other=0.0)
        vv = tl.load(v + off, mask=kmask[:, None], other=0.0)
        if COMPUTE:
            s = tl.dot(qt, tl.trans(kk)) * qk_scale
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(vv.dtype), vv, acc)
            m_i = m_new
        else:
            acc2 += kk.to(tl.float32) + vv.to(tl.float32)
    if not COMPUTE:
        acc += tl.sum(acc2, 0)[None, :]
        l_i += 1.0
        m_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    base = (i_hk * num_splits + i_s).to(tl.int64) * BLOCK_H
    tl.store(o_part + (base + offs_r[:, None]) * D + offs_d[None, :], (acc / l_safe[:, None]).to(o_part.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_part + base + offs_r, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)), mask=row_ok)
    if COMBINE:
        tl.debug_barrier()
        arrived = tl.atomic_add(counter + i_hk, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            offs_rr = tl.arange(0, 4)
            rr_ok = offs_rr < G
            m = tl.full([4], float("-inf"), dtype=tl.float32)
            den = tl.zeros([4], dtype=tl.float32)
            out = tl.zeros([4, D], dtype=tl.float32)
            for s0 in tl.range(0, num_splits, BLOCK_S, num_stages=1):
                offs_s = s0 + tl.arange(0, BLOCK_S)
                msk = (offs_s < num_splits)[:, None] & rr_ok[None, :]
                rows = (i_hk * num_splits + offs_s).to(tl.int64)[:, None] * BLOCK_H + offs_rr[None, :]
                lse = tl.load(lse_part + rows, mask=msk, other=float("-inf"), cache_modifier=".cg")
                op = tl.load(o_part + rows[:, :, None] * D + offs_d[None, None, :], mask=msk[:, :, None], other=0.0,
                             cache_modifier=".cg").to(tl.float32)
                m_new = tl.maximum(m, tl.max(lse, 0))
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
                w = tl.math.exp2(lse - m_sub[None, :])
                alpha = tl.math.exp2(m - m_sub)
                den = den * alpha + tl.sum(w, 0)
                out = out * alpha[:, None] + tl.sum(w[:, :, None] * op, 0)
                m = m_new
            out = out / tl.where(den == 0.0, 1.0, den)[:, None]
            tl.store(o + (i_hk * G + offs_rr)[:, None] * D + offs_d[None, :], out.to(o.dtype.element_ty),
                     mask=rr_ok[:, None])
            tl.store(counter + i_hk, 0)


def dec_v(q, k, v, o, scratch, n_prog, block_n, w, st, compute, combine, block_s=8):
    _, S, HKV, D = k.shape
    G = q.shape[2] // HKV
    nkb = triton.cdiv(S, block_n)
    bps = triton.cdiv(nkb, n_prog // HKV)
    ns = triton.cdiv(nkb, bps)
    o_part, lse_part, counter = scratch
    dec_v_fwd_kernel[(HKV, ns)](q, k, v, o, o_part, lse_part, counter, S, D ** -0.5 * LOG2E, bps, ns,
                                k.stride(1), q.stride(2), G=G, HKV=HKV, D=D, BLOCK_H=16, BLOCK_N=block_n,
                                BLOCK_S=block_s, COMPUTE=compute, COMBINE=combine, LAT=0, num_warps=w, num_stages=st)
    return o


def read_kv(k, v, out, n_prog, block_n, num_warps, num_stages):
    _, S, HKV, D = k.shape
    per = triton.cdiv(triton.cdiv(S, n_prog // HKV), block_n) * block_n
    n_split = triton.cdiv(S, per)
    read_fwd_kernel[(HKV, n_split)](k, v, out, per, S, k.stride(1), HKV=HKV, D=D, BLOCK_N=block_n,
                                     num_warps=num_warps, num_stages=num_stages)
    return out[: HKV * n_split]


def rel(a, b):
    return kt.rel(a, b.double())


def check(name, err, tol):
    ok = err == err and err < tol
    R[SECTION]["checks"].append({"name": name, "err": err, "ok": ok})
    log(f"check {name:<40} {'ok ' if ok else 'FAIL'} {err:.2e}")


# ------------------------------------------------------------------------------------------------
EST_VARIANTS = [  # sampled_block_mass's configurations: (rows per program, key blocks per tile, warps, stages)
    (64, 2, 4, 3), (64, 2, 4, 2), (64, 2, 4, 4), (64, 1, 4, 3), (128, 2, 8, 2), (128, 2, 8, 3), (128, 1, 8, 3),
]
CORE_VARIANTS = [  # block_sparse_attention's K/V loads and launch configuration: (tma, warps, stages)
    (False, 8, 3), (True, 8, 3), (False, 4, 2), (True, 4, 2), (True, 8, 2),
]
CORE2_VARIANTS = [  # (warp_specialize, warps, stages)
    (False, 8, 2), (False, 8, 3), (False, 8, 4), (True, 4, 2), (True, 4, 3), (True, 8, 3),
]


def timed_variant(section, label, run, err_of, tol, base, **info):
    """Run a variant once (checked against the current code by err_of), then time it; a variant that
    fails (e.g. out of shared memory, a compiler error) is logged and skipped."""
    try:
        err = err_of(run())
        check(f"{section} {label}", err, tol)
        ms = gpu_ms(run, rep=50)
    except Exception as e:
        log(f"  {section} variant {label} failed: {e!r}"[:300])
        return
    R[section]["rows"].append({**info, "variant": label, "ms": ms, "x_current": base / ms, "err": err})
    log(f"  {section} {label}: {ms:.2f} ms ({base / ms:.2f}x current)")


def estimator_section(T, H=32, D=128, bq=128, rows=4):
    q, k = rnd(1, T, H, D), rnd(1, T, H, D)
    ref = sampled_block_mass(q, k, bq, 64, rows)
    base = gpu_ms(lambda: sampled_block_mass(q, k, bq, 64, rows), rep=50)
    cfg = getattr(bso.block_mass_fwd_kernel, "best_config", None)
    R["est"]["rows"].append({"T": T, "variant": "current", "ms": base, "cfg": str(cfg)})
    log(f"estimator T={T}: current {base:.2f} ms ({cfg})")
    for bm, kpt, w, st in EST_VARIANTS if not INTERP else [(16, 1, 4, 1), (16, 2, 4, 1)]:
        with held_to(bso.block_mass_fwd_kernel, triton.Config({"BLOCK_M": bm, "KPT": kpt}, num_warps=w,
                                                              num_stages=st)):
            timed_variant("est", f"bm={bm} kpt={kpt} w={w} s={st}", lambda: sampled_block_mass(q, k, bq, 64, rows),
                          lambda got: (got - ref).abs().max().item(), 1e-3, base, T=T)
    del q, k


def core_section(T, density, H=32, D=128, bq=128):
    q, k, v = rnd(1, T, H, D), rnd(1, T, H, D), rnd(1, T, H, D)
    bi, bc = density_lists(T, H, density, dev=DEV, block_size_q=bq)
    o = torch.empty_like(q)
    ref = block_sparse_attention(q, k, v, bi, bc, bq, 64).float()
    base = gpu_ms(lambda: block_sparse_attention(q, k, v, bi, bc, bq, 64, out=o), rep=30)
    cfg = getattr(bso.block_sparse_fwd_kernel, "best_config", None)
    R["core"]["rows"].append({"T": T, "density": density, "variant": "current", "ms": base, "cfg": str(cfg)})
    log(f"core T={T} density {density}: current {base:.2f} ms ({cfg})")
    o2 = torch.full_like(q, float("nan"))
    for tma, w, st in CORE_VARIANTS:
        if INTERP and tma:
            continue
        with held_to(bso.block_sparse_fwd_kernel, triton.Config({}, num_warps=w, num_stages=st)):
            timed_variant("core", f"tma={tma} w={w} s={st}",
                          lambda: block_sparse_attention(q, k, v, bi, bc, bq, 64, out=o2, tma=tma),
                          lambda got: rel(got, ref), 1e-2, base, T=T, density=density)
    for ws, w, st in CORE2_VARIANTS:
        if INTERP:
            continue
        timed_variant("core", f"pair ws={ws} w={w} s={st}", lambda: core2(q, k, v, bi, bc, bq, 64, ws, w, st, o2),
                      lambda got: rel(got, ref), 1e-2, base, T=T, density=density)
    del q, k, v, o, bi, bc


def read_section(S=32768, HKV=8, H=32, D=128):
    nbytes = 2 * S * HKV * D * 2
    L = max(2, -(-(2**30) // nbytes)) if DEV == "cuda" else 2
    ks = [rnd(1, S, HKV, D) for _ in range(L)]
    vs = [rnd(1, S, HKV, D) for _ in range(L)]
    out = torch.empty(1 << 16, device=DEV, dtype=torch.float32)
    got = read_kv(ks[0], vs[0], out, 264, 64, 4, 3).sum()
    check("read kernel sum", rel(got, ks[0].float().sum() + vs[0].float().sum()), 1e-3)
    q = rnd(1, 1, H, D)
    o = torch.empty_like(q)
    seqlens = torch.full((1,), S, device=DEV, dtype=torch.int32)

    def layers(fn):
        return [lambda i=i: fn(i) for i in range(L)]

    rows = {}
    rows["flash_decode"] = layers_ms(layers(lambda i: flash_decode(q, ks[i], vs[i], seqlens=seqlens,
                                                                            max_seqlen=S, out=o)), graph=True)
    scratch = (torch.empty(8 * 4096 * 16 * D, device=DEV, dtype=torch.float32),
               torch.empty(8 * 4096 * 16, device=DEV, dtype=torch.float32),
               torch.zeros(1024, device=DEV, dtype=torch.int32))
    o2 = torch.empty_like(q)
    ref = flash_decode(q, ks[0], vs[0], seqlens=seqlens, max_seqlen=S).float()
    dec_v(q, ks[0], vs[0], o2, scratch, 256, 64, 4, 3, True, True)
    check("dec_v compute+combine", rel(o2, ref), 1e-2)
    # (the first two runs stored all 16 partial rows; these store the valid ones, as flash_decode now does)
    for n_prog, bn, w, st, bs in ((256, 64, 4, 3, 8), (256, 64, 4, 3, 32), (512, 64, 4, 3, 32), (256, 64, 4, 4, 32)):
        for compute in (True, False):
            for combine in (True, False):
                rows[f"dec p={n_prog} bn={bn} w={w} s={st} bs={bs} compute={int(compute)} combine={int(combine)}"] = \
                    layers_ms(layers(lambda i, a=(n_prog, bn, w, st, compute, combine, bs):
                                              dec_v(q, ks[i], vs[i], o2, scratch, *a[:6], block_s=a[6])), graph=True)
    # bf16 partials: half the bytes the combine reads
    scratch16 = (scratch[0].to(torch.bfloat16), scratch[1], scratch[2])
    dec_v(q, ks[0], vs[0], o2, scratch16, 256, 64, 4, 3, True, True, block_s=32)
    check("dec_v bf16 partials", rel(o2, ref), 1e-2)
    rows["dec p=256 bn=64 w=4 s=3 bs=32 bf16 partials"] = layers_ms(
        layers(lambda i: dec_v(q, ks[i], vs[i], o2, scratch16, 256, 64, 4, 3, True, True, block_s=32)), graph=True)
    for n_prog in (256,):
        for bn, w, st in ((64, 4, 3),):
            rows[f"read p={n_prog} bn={bn} w={w} s={st}"] = layers_ms(
                layers(lambda i, n=n_prog, b=bn, w=w, s=st: read_kv(ks[i], vs[i], out, n, b, w, s)), graph=True)
    kv = [torch.stack([a, b]) for a, b in zip(ks, vs)]
    rows["torch.sum(kv)"] = layers_ms(layers(lambda i: kv[i].sum()), graph=True)
    # a copy of half the bytes: the same 134 MB of traffic (67 read + 67 written)
    dst = torch.empty(kv[0].numel() // 2, device=DEV, dtype=kv[0].dtype)
    rows["copy 67MB (134MB traffic)"] = layers_ms(layers(lambda i: dst.copy_(kv[i].view(-1)[: dst.numel()])),
                                                           graph=True)
    for name, ms in rows.items():
        tbs = nbytes / ms / 1e9
        R["read"]["rows"].append({"name": name, "us": ms * 1e3, "TBps": tbs, "pct_copy_4.24": tbs / 4.24})
        log(f"read {name:<34} {ms * 1e3:7.1f} us  {tbs:5.2f} TB/s  {100 * tbs / 4.24:5.1f}% of 4.24")


def flash_section(lens=(16384, 65536), H=32, D=128):
    """flash_prefill with K/V tiles by TMA and by pointers, beside SDPA (causal, bf16)."""
    from retrogram.kernels.flash_prefill import flash_prefill

    for T in lens:
        q, k, v = rnd(1, T, H, D), rnd(1, T, H, D), rnd(1, T, H, D)
        qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        flops = prefill_flops(T, H, D)
        row = {"T": T, "sdpa_ms": gpu_ms(lambda: sdpa_flash(qs, ks, vs, True))}
        del qs, ks, vs
        o = torch.empty_like(q)
        ref = flash_prefill(q, k, v, causal=True, tma=False).float()
        for tma in (False, True):
            got = flash_prefill(q, k, v, causal=True, out=torch.full_like(q, float("nan")), tma=tma)
            check(f"flash_prefill T={T} tma={tma} vs pointer loads", rel(got, ref), 1e-2)
            row[f"tma{int(tma)}_ms"] = gpu_ms(lambda: flash_prefill(q, k, v, causal=True, out=o, tma=tma))
        for key in ("sdpa_ms", "tma0_ms", "tma1_ms"):
            row[key.replace("_ms", "_TFLOPs")] = flops / row[key] / 1e9
        R["flash"]["rows"].append(row)
        log(f"flash T={T}: SDPA {row['sdpa_TFLOPs']:.0f} TFLOP/s, pointer loads {row['tma0_TFLOPs']:.0f}, "
            f"TMA {row['tma1_TFLOPs']:.0f} ({row['tma0_ms'] / row['tma1_ms']:.3f}x)")
        del q, k, v, o


def main():
    global SECTION
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--sections", nargs="*", default=["read", "est", "core", "flash"],
                    choices=["read", "est", "core", "flash"])
    ap.add_argument("--smoke", action="store_true", help="CPU (Triton interpreter), tiny sizes")
    common.add_output_args(ap)
    args = ap.parse_args()
    common.check_kernel_device(ap, args.smoke)
    smoke = DEV != "cuda"
    if not smoke:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))
        log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    t0 = time.time()
    sections = {"read": (read_section, () if not smoke else (256, 2, 4, 16)),
                "est": (estimator_section, (131072,) if not smoke else (300, 2, 16, 32, 4)),
                "core": (core_section, (131072, 0.253) if not smoke else (300, 0.5, 2, 16, 32)),
                "flash": (flash_section, () if not smoke else ((100,), 2, 16))}
    for name in args.sections:
        sec, sargs = sections[name]
        SECTION = name
        R[name] = {"rows": [], "checks": []}
        try:
            sec(*sargs)
        except Exception as e:
            import traceback
            traceback.print_exc()
            log(f"!! {sec.__name__} failed: {e!r}")
            R[name]["error"] = repr(e)
        log(f"-- {sec.__name__} done at {time.time() - t0:.0f} s")
    if not smoke or args.out is not None:
        log(f"wrote {common.save('kernels_variants' if not smoke else 'kernels_variants_smoke', R, out=args.out, tag=args.tag, merge=True)}")


if __name__ == "__main__":
    main()
