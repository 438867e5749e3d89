"""Benchmark of retrogram.kernels on a GPU, side by side with PyTorch SDPA (flash backend).

One run: (1) ceilings (device copy bandwidth, bf16 matmul), (2) correctness of every kernel against
its float64 reference on the GPU (retrogram.kernels.testing: bf16 inputs, fresh random data, outputs
poisoned with NaN; the same checks tests/kernels/test_kernels_gpu.py runs), (3) timings: flash_prefill vs SDPA
(causal, 32 heads x 128, 4k..128k), flash_decode vs SDPA (batch 1 and 8, 32k..128k, contiguous and paged
caches), HiP prefill/decode, vertical-slash prefill and CCA. Prints a table; results: kernels_<tag>.json
(--decode: kernels_decode_<tag>.json).

    python -m bench.kernels.attention [--max-len 131072] [--skip-checks] [--decode] [--out DIR]
    TRITON_INTERPRET=1 python -m bench.kernels.attention --smoke     # every section at toy sizes on a CPU
"""

from __future__ import annotations

import functools
import importlib.util
import math
import time

import torch
import triton

from bench import common
from bench.common import gpu_ms, graph_ms, layers_ms, log
from bench.kernels.inputs import per_layer, prefill_flops, sdpa_flash
from retrogram.kernels import testing as kt
from retrogram.kernels.block_sparse import block_sparse_attention
from retrogram.kernels.block_sparse_prefill import block_sparse_prefill
from retrogram.kernels.cca_attention import cca_attention
from retrogram.kernels.flash_decode import flash_decode
from retrogram.kernels.flash_prefill import flash_prefill, flash_prefill_fwd_kernel
from retrogram.kernels.hip_attention import (hip_attention_prefill, hip_decode, hip_decode_select, hip_select,
                                             prefill_kend)

DEV = "cuda"
BF16 = torch.bfloat16
BASELINE = None  # another flash_decode ops.py timed beside this one (--decode-baseline)


def load_baseline(path):
    """flash_decode from another copy of kernels/flash_decode/ops.py (e.g. `git show HEAD~1:...`)."""
    spec = importlib.util.spec_from_file_location("retrogram.kernels.flash_decode._baseline", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "retrogram.kernels.flash_decode"
    spec.loader.exec_module(mod)
    return mod


RESULTS: dict = {"checks": [], "prefill": [], "decode": [], "hip_prefill": [], "hip_decode": [],
                 "vs_prefill": [], "cca": [], "errors": []}


def guarded(name):
    """A section whose failure is recorded in RESULTS["errors"] instead of ending the run."""
    def deco(fn):
        return functools.wraps(fn)(lambda *a, **kw: common.guarded(RESULTS["errors"], name, fn, *a, **kw))
    return deco


def rnd(*shape, dtype=None):
    return kt.rnd(*shape, device=DEV, dtype=dtype or BF16)


# ----------------------------------------------------------------------------------------------
@guarded("ceilings")
def ceilings():
    n = 1 << 30  # 2 GiB of bf16 read + 2 GiB written
    a = torch.randn(n, device=DEV, dtype=BF16)
    b = torch.empty_like(a)
    ms = gpu_ms(lambda: b.copy_(a))
    copy_tbs = 2 * a.numel() * 2 / ms / 1e9
    del a, b
    x, y = rnd(8192, 8192), rnd(8192, 8192)
    ms_mm = gpu_ms(lambda: x @ y)
    RESULTS["ceilings"] = {"copy_TBps": copy_tbs, "bf16_matmul_TFLOPs": 2 * 8192**3 / ms_mm / 1e9}
    log(f"ceilings: copy {copy_tbs:.2f} TB/s, bf16 matmul {RESULTS['ceilings']['bf16_matmul_TFLOPs']:.0f} TFLOP/s")


def record(check: kt.Check) -> None:
    RESULTS["checks"].append(check.record())
    log(f"check {check.kernel:<22} {'ok ' if check.ok else 'FAIL'} rel_err={check.err:.2e} {check.info}")


@guarded("checks")
def checks(f=1):
    """Every kernel against its float64 reference (f > 1 divides the sequence lengths: smoke runs)."""
    for c in kt.attention_checks(f, DEV, BF16):
        record(c)


@guarded("decode_checks")
def decode_checks(f=1):
    """flash_decode, the fused HiP decode selection (the blocks of the multi-launch hip_select) and
    hip_decode, on the GPU in bf16."""
    for c in kt.decode_checks(f, DEV, BF16):
        record(c)


# ----------------------------------------------------------------------------------------------
@guarded("prefill")
def prefill(lens, H=32, D=128):
    for T in lens:
        q, k, v = rnd(1, T, H, D), rnd(1, T, H, D), rnd(1, T, H, D)
        qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # SDPA's [B, H, T, D]
        row = {"T": T, "H": H, "D": D}
        fl = prefill_flops(T, H, D)
        ms = gpu_ms(lambda: sdpa_flash(qs, ks, vs, True))
        row["sdpa_ms"], row["sdpa_tflops"] = ms, fl / ms / 1e9
        o = torch.empty_like(q)
        ms = gpu_ms(lambda: flash_prefill(q, k, v, causal=True, out=o))
        row["flash_ms"], row["flash_tflops"] = ms, fl / ms / 1e9
        row["flash_config"] = str(flash_prefill_fwd_kernel.best_config)
        row["flash_vs_sdpa"] = row["sdpa_ms"] / row["flash_ms"]
        # the same output as SDPA (bf16 both): a sanity check at full size
        row["rel_diff_vs_sdpa"] = ((o.float() - sdpa_flash(qs, ks, vs, True).transpose(1, 2).float()).norm()
                                   / o.float().norm()).item()
        RESULTS["prefill"].append(row)
        log(f"prefill T={T:>6}: sdpa {row['sdpa_ms']:8.2f} ms {row['sdpa_tflops']:5.0f} TF/s | flash "
            f"{row['flash_ms']:8.2f} ms {row['flash_tflops']:5.0f} TF/s ({row['flash_vs_sdpa']:.2f}x) diff {row['rel_diff_vs_sdpa']:.1e}")
        del q, k, v, qs, ks, vs, o
        torch.cuda.empty_cache()


SPARSE_CONFIGS = (
    # (result list, label, kwargs): fixed budgets (no recall bound) and the current defaults (top-p 0.95 of
    # the sampled attention mass: on random data attention is flat, so they keep most blocks)
    ("hip_prefill", "rep top-32", dict(estimator="rep", topk=32, n_sink=1, n_local=4)),
    ("hip_prefill", "mass p0.95 (default)", dict(estimator="mass", top_p=0.95, n_sink=1, n_local=4)),
    ("vs_prefill", "last_q 32v/16s", dict(estimator="last_q", n_vertical=32, n_slash=16, n_sink=1, n_local=2)),
    ("vs_prefill", "mass p0.95 (default)", dict(estimator="mass", top_p=0.95, n_vertical=32, n_slash=16, n_sink=1,
                                                n_local=2)),
)


def sdpa_causal_ms(q, k, v):
    """SDPA's time on the causal problem q, k, v [1, T, H, D]: the prefill section's when it timed this T."""
    done = {r["T"]: r["sdpa_ms"] for r in RESULTS["prefill"]}
    if q.shape[1] in done:
        return done[q.shape[1]]
    qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return gpu_ms(lambda: sdpa_flash(qs, ks, vs, True))


@guarded("sparse_prefill")
def sparse_prefill(lens, H=32, D=128, configs=SPARSE_CONFIGS):
    sdpa_ms = {}
    for T in lens:
        q, k, v = rnd(1, T, H, D), rnd(1, T, H, D), rnd(1, T, H, D)
        sdpa_ms[T] = sdpa_causal_ms(q, k, v)
        o = torch.empty_like(q)
        kend = prefill_kend(T, T, 64, True, DEV)
        nvis = ((kend + 63) // 64).float().sum().item() * H
        for key, label, cfg in configs:
            fn = hip_attention_prefill if key == "hip_prefill" else block_sparse_prefill
            row = {"T": T, "H": H, "D": D, "sdpa_ms": sdpa_ms[T], "label": label, **cfg}
            row["total_ms"] = gpu_ms(lambda: fn(q, k, v, dense_below=0, out=o, **cfg))
            _, blocks = fn(q, k, v, dense_below=0, out=o, return_blocks=True, **cfg)
            row["blocks_mean"] = blocks[1].float().mean().item()
            row["density"] = blocks[1].float().sum().item() / nvis  # kept / visible key blocks
            row["attn_ms"] = gpu_ms(lambda: block_sparse_attention(q, k, v, *blocks, 64, 64, out=o))
            row["speedup_vs_sdpa"] = sdpa_ms[T] / row["total_ms"]
            RESULTS[key].append(row)
            log(f"{key[:3]} prefill T={T:>6} {label:<22}: {row['total_ms']:7.2f} ms (attn {row['attn_ms']:.2f}) vs sdpa "
                f"{sdpa_ms[T]:.2f} -> {row['speedup_vs_sdpa']:.1f}x, density {row['density']:.3f}")
            del blocks
        del q, k, v, o
        torch.cuda.empty_cache() if DEV == "cuda" else None


@guarded("decode")
def decode(lens, batches=(1, 8), H=32, D=128, hkv_list=(32, 8), hip_cfg=None, refresh_every=8):
    """Each method timed eagerly and replayed from a CUDA graph (as a decoder with CUDA graphs runs it),
    over enough layers (own caches) that every call reads from DRAM (bench_layers_ms); bandwidth = K
    and V bytes of one layer's cache / time per call. flash_dobench_graph_ms: the older do_bench timing."""
    hip_cfg = hip_cfg or dict(topk=32, n_sink=1, n_local=4)
    n_hip = hip_cfg["n_sink"] + hip_cfg["topk"] + hip_cfg["n_local"]
    for HKV in hkv_list:
        for B in batches:
            for S in lens:
                nbytes = 2 * B * S * HKV * D * 2
                # K and V bytes of the blocks the sparse step reads (sink + selected + local)
                hip_bytes = nbytes * min(1.0, n_hip / triton.cdiv(S, 64))
                # both well past L2 (50 MB); 2 in a smoke run
                L = max(1, math.ceil(max(2**30 / nbytes, 150e6 / hip_bytes))) if DEV == "cuda" else 2
                q = rnd(B, 1, H, D)
                k, v = rnd(L * B, S, HKV, D), rnd(L * B, S, HKV, D)
                ks, vs = per_layer(k, B, L), per_layer(v, B, L)
                row = {"B": B, "S": S, "H": H, "HKV": HKV, "D": D, "kv_bytes": nbytes, "layers": L,
                       "hip_step_bytes": hip_bytes}

                def timed(name, fn):
                    fns = [lambda i=i: fn(i) for i in range(L)]
                    row[name + "_ms"] = layers_ms(fns, graph=False)
                    row[name + "_graph_ms"] = layers_ms(fns, graph=True)

                if HKV == H:
                    ks_t = [x.transpose(1, 2).contiguous() for x in ks]
                    vs_t = [x.transpose(1, 2).contiguous() for x in vs]
                    qs = q.transpose(1, 2)
                    timed("sdpa", lambda i: sdpa_flash(qs, ks_t[i], vs_t[i], False))
                    del ks_t, vs_t
                o = torch.empty_like(q)
                seqlens = torch.full((B,), S, device=DEV, dtype=torch.int32)
                timed("flash", lambda i: flash_decode(q, ks[i], vs[i], seqlens=seqlens, max_seqlen=S, out=o))
                if BASELINE is not None:
                    row["base_graph_ms"] = layers_ms(
                        [lambda i=i: BASELINE.flash_decode(q, ks[i], vs[i], seqlens=seqlens, max_seqlen=S, out=o)
                         for i in range(L)], graph=True)
                row["flash_dobench_graph_ms"] = graph_ms(
                    lambda: flash_decode(q, ks[0], vs[0], seqlens=seqlens, max_seqlen=S, out=o))
                kp, vp, table = kt.to_paged(k, v, 256)
                tables = per_layer(table, B, L)
                del k, v, ks, vs
                torch.cuda.empty_cache()
                timed("paged", lambda i: flash_decode(q, kp, vp, seqlens=seqlens, block_table=tables[i], max_seqlen=S,
                                                      out=o))
                if BASELINE is not None:
                    row["base_paged_graph_ms"] = layers_ms(
                        [lambda i=i: BASELINE.flash_decode(q, kp, vp, seqlens=seqlens, block_table=tables[i],
                                                           max_seqlen=S, out=o) for i in range(L)], graph=True)
                # HiP decode over the paged cache: the selection is refreshed every `refresh_every` steps
                timed("hip_select", lambda i: hip_decode_select(q, kp, seqlens, S, block_table=tables[i], **hip_cfg))
                # the multi-launch hierarchical selection it replaces (same blocks), for comparison
                kend = seqlens.long()[:, None]
                timed("hip_select_multi", lambda i: hip_select(q, kp, kend, S, 1, 64, hip_cfg["topk"], hip_cfg["n_sink"],
                                                               hip_cfg["n_local"], group_heads=True, block_table=tables[i]))
                sels = [hip_decode_select(q, kp, seqlens, S, block_table=t, **hip_cfg) for t in tables]
                timed("hip_step", lambda i: hip_decode(q, kp, vp, sels[i], seqlens, tables[i], n_sink=hip_cfg["n_sink"],
                                                       n_local=hip_cfg["n_local"], out=o))
                row["flash_dobench_graph_TBps"] = nbytes / row["flash_dobench_graph_ms"] / 1e9
                for sfx in ("", "_graph"):
                    for name in ("sdpa", "flash", "paged", "base", "base_paged"):
                        if name + sfx + "_ms" in row:
                            row[name + sfx + "_TBps"] = nbytes / row[name + sfx + "_ms"] / 1e9
                    row["hip_step" + sfx + "_TBps"] = hip_bytes / row["hip_step" + sfx + "_ms"] / 1e9
                    row["hip_amortized" + sfx + "_ms"] = row["hip_step" + sfx + "_ms"] + row["hip_select" + sfx + "_ms"] / refresh_every
                    row["hip_speedup_vs_dense" + sfx] = row["paged" + sfx + "_ms"] / row["hip_amortized" + sfx + "_ms"]
                RESULTS["decode"].append(row)
                log(f"decode B={B} S={S:>6} HKV={HKV:>2} x{L} layers (graph): sdpa {row.get('sdpa_graph_TBps', float('nan')):.2f}"
                    f" TB/s | flash {row['flash_graph_TBps']:.2f} TB/s ({row['flash_graph_ms']*1e3:.0f} us; do_bench "
                    f"{row['flash_dobench_graph_ms']*1e3:.0f} us) | paged {row['paged_graph_TBps']:.2f} TB/s | hip step "
                    f"{row['hip_step_graph_ms']*1e3:.1f} us + select {row['hip_select_graph_ms']*1e3:.1f} us/{refresh_every} "
                    f"({row['hip_speedup_vs_dense_graph']:.1f}x dense; multi-launch select "
                    f"{row['hip_select_multi_graph_ms']*1e3:.0f} us, step {row['hip_step_graph_TBps']:.2f} TB/s); eager: "
                    f"flash {row['flash_TBps']:.2f} TB/s, hip step {row['hip_step_ms']*1e3:.0f} us + select "
                    f"{row['hip_select_ms']*1e3:.0f} us/{refresh_every}, {row['hip_speedup_vs_dense']:.1f}x")
                del q, kp, vp, o, sels
                torch.cuda.empty_cache()


@guarded("decode_sweep")
def decode_sweep(shapes=((8, 32768, 32, True), (8, 131072, 32, True), (1, 32768, 8, False), (1, 32768, 8, True),
                         (1, 131072, 8, False), (8, 32768, 8, True), (1, 32768, 32, False)),
                 H=32, D=128, grid=None, apply=True, rep_ms=100):
    """Tune flash_decode's launch per shape class (paged, GQA, batch x KV heads >= 64): time per call of
    every (num_warps, num_stages, waves, block_n) in a small grid, timed as the tables are (bench_layers_ms:
    a CUDA graph over enough layers' caches that each call reads DRAM; do_bench's L2 flush misranks these
    short kernels); the best config of each class (summed time over its shapes) is installed in
    DECODE_CONFIGS for the rest of the run (apply=True)."""
    from retrogram.kernels.flash_decode import ops as fd

    grid = grid or [(w, st, wv, bn) for bn in (64, 128) for w in (4, 8) for st in (2, 3, 4) for wv in (2, 4, 8)]
    times: dict = {}
    for B, S, HKV, paged in shapes:
        nbytes = 2 * B * S * HKV * D * 2
        L = max(1, math.ceil(2**30 / nbytes)) if DEV == "cuda" else 2  # past L2 (50 MB)
        q = rnd(B, 1, H, D)
        k, v = rnd(L * B, S, HKV, D), rnd(L * B, S, HKV, D)
        seqlens = torch.full((B,), S, device=DEV, dtype=torch.int32)
        if paged:
            kp, vp, table = kt.to_paged(k, v, 256)
            caches = [(kp, vp, t) for t in per_layer(table, B, L)]
        else:
            caches = [(kk, vv, None) for kk, vv in zip(per_layer(k, B, L), per_layer(v, B, L))]
        o = torch.empty_like(q)
        k0, v0, t0 = caches[0]
        ref = flash_decode(q, k0, v0, seqlens=seqlens, block_table=t0, max_seqlen=S).float()
        cls = (paged, H // HKV > 1, B * HKV >= 64)
        row = {"B": B, "S": S, "HKV": HKV, "paged": paged, "class": list(cls), "kv_bytes": nbytes, "layers": L,
               "configs": []}
        for cfg in grid:
            w, st, wv, bn = cfg
            fns = [lambda kk=kk, vv=vv, tt=tt: flash_decode(q, kk, vv, seqlens=seqlens, block_table=tt, max_seqlen=S,
                                                             out=o, num_warps=w, num_stages=st, waves=wv, block_n=bn)
                   for kk, vv, tt in caches]
            try:
                fns[0]()
                err = ((o.float() - ref).norm() / ref.norm()).item()
                ms = layers_ms(fns, graph=True, rep_ms=rep_ms)
            except Exception as e:  # e.g. out of shared memory for a large tile
                log(f"   sweep {cfg} failed: {e!r}"[:200])
                continue
            ok = err < 1e-2
            row["configs"].append({"cfg": list(cfg), "ms": ms, "TBps": nbytes / ms / 1e9, "rel_diff": err, "ok": ok})
        best = min((c for c in row["configs"] if c["ok"]), key=lambda c: c["ms"])
        row["best"] = best
        for c in row["configs"]:
            if c["ok"]:
                times.setdefault(cls, {}).setdefault(tuple(c["cfg"]), []).append(c["ms"] / best["ms"])
        RESULTS.setdefault("decode_sweep", []).append(row)
        log(f"sweep decode B={B} S={S:>6} HKV={HKV:>2} paged={paged}: best {best['cfg']} {best['TBps']:.2f} TB/s"
            f" ({best['ms'] * 1e3:.0f} us); default {fd.decode_config(paged, H // HKV, B * HKV)}")
        del q, k, v, o, caches
        if DEV == "cuda":
            torch.cuda.empty_cache()
    chosen = {}
    for cls, d in times.items():
        n = max(len(x) for x in d.values())
        # relative time summed over the class's shapes (each normalised by its best)
        cfg = min((c for c, x in d.items() if len(x) == n), key=lambda c: sum(d[c]))
        chosen[cls] = cfg
    RESULTS["decode_configs_chosen"] = {str(k): list(v) for k, v in chosen.items()}
    log(f"decode configs chosen: {chosen}")
    if apply:
        fd.DECODE_CONFIGS.update(chosen)


@guarded("cca")
def cca(B=4, T=4096, C=64, N=256, H=32, D=128):
    L = T // C
    q = rnd(B, T, H, D)
    kk, vv = rnd(B, L, N, H, D), rnd(B, L, N, H, D)
    # SDPA on the same problem: every chunk a batch entry
    qs = q.view(B * L, C, H, D).transpose(1, 2).contiguous()
    ks = kk.view(B * L, N, H, D).transpose(1, 2).contiguous()
    vs = vv.view(B * L, N, H, D).transpose(1, 2).contiguous()
    fl = 4 * B * T * N * H * D
    row = {"B": B, "T": T, "chunk": C, "neighbour_tokens": N, "H": H, "D": D}
    row["sdpa_ms"] = gpu_ms(lambda: sdpa_flash(qs, ks, vs, False))
    row["cca_ms"] = gpu_ms(lambda: cca_attention(q, kk, vv, C))
    row["sdpa_tflops"], row["cca_tflops"] = fl / row["sdpa_ms"] / 1e9, fl / row["cca_ms"] / 1e9
    RESULTS["cca"].append(row)
    log(f"cca B={B} T={T} N={N}: sdpa {row['sdpa_ms']:.3f} ms ({row['sdpa_tflops']:.0f} TF/s) | cca {row['cca_ms']:.3f} ms "
        f"({row['cca_tflops']:.0f} TF/s)")


def table():
    log("\n=== summary ===")
    log("prefill causal bf16 H=32 D=128       T | SDPA TF/s | flash TF/s | flash/SDPA")
    for r in RESULTS["prefill"]:
        log(f"{'':>32}{r['T']:>7} | {r['sdpa_tflops']:9.0f} | {r['flash_tflops']:10.0f} | {r['flash_vs_sdpa']:.2f}")
    log("sparse prefill (random data)                   T | SDPA ms | ms (x SDPA)     | density")
    for key in ("hip_prefill", "vs_prefill"):
        for r in RESULTS[key]:
            log(f"{key.split('_')[0] + ' ' + r.get('label', ''):>40}{r['T']:>8} | {r['sdpa_ms']:7.1f} | {r['total_ms']:6.1f} "
                f"({r['speedup_vs_sdpa']:4.1f}x) | {r['density']:.3f}")
    copy = RESULTS.get("ceilings", {}).get("copy_TBps", float("nan"))
    log(f"decode (CUDA graph; % of copy {copy:.2f} TB/s)  B      S HKV | SDPA TB/s | flash TB/s     | paged TB/s     | "
        f"HiP us/step (x paged dense) | eager HiP x dense")
    for r in RESULTS["decode"]:
        log(f"{r['B']:>45} {r['S']:>6} {r['HKV']:>3} | {r.get('sdpa_graph_TBps', float('nan')):9.2f} | "
            f"{r['flash_graph_TBps']:5.2f} ({100 * r['flash_graph_TBps'] / copy:3.0f}%) | "
            f"{r['paged_graph_TBps']:5.2f} ({100 * r['paged_graph_TBps'] / copy:3.0f}%) | "
            f"{r['hip_amortized_graph_ms']*1e3:7.1f} ({r['hip_speedup_vs_dense_graph']:4.1f}x)        | "
            f"{r['hip_speedup_vs_dense']:.1f}x")
    if any("base_graph_TBps" in r for r in RESULTS["decode"]):
        log(f"decode, baseline kernel ({RESULTS.get('baseline')})  B      S HKV | flash TB/s     | paged TB/s")
        for r in RESULTS["decode"]:
            log(f"{r['B']:>45} {r['S']:>6} {r['HKV']:>3} | {r['base_graph_TBps']:5.2f} ({100 * r['base_graph_TBps'] / copy:3.0f}%) | "
                f"{r['base_paged_graph_TBps']:5.2f} ({100 * r['base_paged_graph_TBps'] / copy:3.0f}%)")
    bad = [c for c in RESULTS["checks"] if not c["ok"]]
    log(f"checks: {len(RESULTS['checks']) - len(bad)}/{len(RESULTS['checks'])} ok; errors: {len(RESULTS['errors'])}")


def smoke(args):
    """Every section at toy sizes (float32 on a CPU): catches errors before a GPU run."""
    global DEV, BF16
    if not common.on_gpu():
        DEV, BF16 = "cpu", torch.float32
    if not args.skip_checks:
        checks(f=16)
    prefill([256], H=2, D=32)
    sparse_prefill([512], H=2, D=32, configs=[("hip_prefill", "rep", dict(estimator="rep", topk=2, n_sink=1, n_local=2)),
                                              ("hip_prefill", "mass", dict(estimator="mass", top_p=0.9, n_local=2)),
                                              ("vs_prefill", "last_q", dict(estimator="last_q", n_vertical=2, n_slash=2)),
                                              ("vs_prefill", "mass", dict(estimator="mass", n_vertical=2, n_slash=2))])
    decode([1024], batches=(1,), H=4, D=32, hkv_list=(4, 2), hip_cfg=dict(topk=2, n_sink=1, n_local=2))
    decode_sweep(shapes=((1, 1024, 2, False), (2, 1024, 2, True)), H=4, D=32, grid=[(4, 1, 2, 16), (4, 1, 1, 16)],
                 apply=False)
    cca(B=1, T=128, C=64, N=32, H=2, D=32)
    table()
    if args.out:   # a smoke run writes nothing unless asked to
        log(f"wrote {common.save('kernels_smoke', RESULTS, out=args.out, tag=args.tag)}")


def main():
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--max-len", type=int, default=131072)
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; on a CPU under TRITON_INTERPRET=1")
    ap.add_argument("--decode", action="store_true",
                    help="decode only: checks, launch sweep of the batch-1 classes, decode and HiP decode timings "
                         "(kernels_decode_<tag>.json)")
    ap.add_argument("--decode-baseline", default=None,
                    help="another flash_decode ops.py, timed beside this one in the decode section")
    ap.add_argument("--checks", action="store_true",
                    help="only every kernel's GPU check against its float64 reference, the attention kernels' and "
                         "the sparse selection's (kernels_checks_<tag>.json; tests/kernels/test_kernels_gpu.py runs the same)")
    common.add_output_args(ap)
    args = ap.parse_args()
    common.check_kernel_device(ap, args.smoke)
    t0 = time.time()
    if args.decode_baseline:
        global BASELINE
        BASELINE = load_baseline(args.decode_baseline)
        RESULTS["baseline"] = args.decode_baseline
    if args.smoke:
        smoke(args)
        return
    RESULTS["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    log(f"{torch.cuda.get_device_name()}, {RESULTS['sms']} SMs, torch {torch.__version__}, triton {triton.__version__}")
    if args.checks:
        checks()
        for c in kt.selection_checks(device=DEV, dtype=BF16):
            record(c)
        bad = [c for c in RESULTS["checks"] if not c["ok"]]
        log(f"{len(bad)} failed of {len(RESULTS['checks'])}; errors {RESULTS['errors']}")
        log(f"wrote {common.save('kernels_checks', {'checks': RESULTS['checks'], 'errors': RESULTS['errors']}, out=args.out, tag=args.tag)}")
        return
    ceilings()
    if args.decode:
        if not args.skip_checks:
            decode_checks()
        decode_sweep(shapes=((1, 32768, 8, False), (1, 32768, 8, True), (1, 131072, 8, False), (1, 131072, 32, False),
                             (1, 32768, 32, True), (8, 32768, 8, True)),
                     grid=[(4, st, wv, bn) for bn in (64, 128) for st in (2, 3, 4) for wv in (1, 2, 4)],
                     rep_ms=40)
        if not args.skip_checks:
            decode_checks()  # again, with the configs the sweep installed
        decode([n for n in (32768, 131072) if n <= args.max_len])
        RESULTS["wall_s"] = time.time() - t0
        table()
        log(f"wrote {common.save('kernels_decode', RESULTS, out=args.out, tag=args.tag)}")
        return
    # tune flash_prefill's main configuration on a mid-size problem before anything else calls it
    q = rnd(1, 16384, 32, 128)
    flash_prefill(q, q, q, causal=True)
    del q
    if not args.skip_checks:
        checks()
    lens = [n for n in (4096, 8192, 16384, 32768, 65536, 131072) if n <= args.max_len]
    prefill(lens)
    sparse_prefill([n for n in (32768, 65536, 131072) if n <= args.max_len])
    decode([n for n in (32768, 131072) if n <= args.max_len])
    cca()
    RESULTS["wall_s"] = time.time() - t0
    table()
    log(f"wrote {common.save('kernels', RESULTS, out=args.out, tag=args.tag)}")


if __name__ == "__main__":
    main()
