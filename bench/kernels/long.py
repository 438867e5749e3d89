"""Sparse prefill on SmolLM2's real attention at 32k-128k on the GPU, and the main kernel tables.

1. SmolLM2-135M-Instruct's first layers (packed by bench.kernels.smollm2_pack: the GGUF's raw Q4_1 /
   Q8_0 blocks, dequantized with torch into the weights transformers loads) run a long text
   (Shakespeare plays; RoPE scaled linearly by T / 8192 as in bench.kernels.smollm2); q/k/v after
   RoPE of every `--layer-step`-th layer are kept. Per layer and length:
   - the oracle: the fewest key blocks holding 0.95 of each head's exact attention mass (mean over 64
     query blocks spread evenly), as a fraction of the visible blocks;
   - HiP "mass" prefill and vertical-slash prefill ("mass" estimator: pattern ∪ top-p completion;
     and MInference's "last_q" pattern for reference): recall (exact attention mass on the kept
     blocks, those query blocks) and density (kept / visible key blocks, all query blocks and heads);
   - time on that layer's real q/k/v (9 query / 3 KV heads x 64): SDPA flash, flash_prefill, HiP and
     vertical-slash end to end (estimate + selection + attention).
2. The issue's shape (32 heads x 128, bf16, causal) at each length with the densities measured in 1:
   estimator + selection (timed on random data) + block-sparse attention at that density.
3. bench.kernels.attention's sections with the current defaults (checks, dense prefill, sparse prefill,
   decode, CCA), unless --skip-main: results kernels_<tag>.json.
Prints a table; results kernels_long_<tag>.json.
--sparse-only: no pack; the selection kernels against their references on the GPU, then section 2 at
the densities recorded in bench/results/kernels_long_h200.json (results kernels_sparse_<tag>.json).

    python -m bench.kernels.long --pack .smollm2-carry/pack.pt [--lens 32768 65536 131072] [--skip-main]
    python -m bench.kernels.long --sparse-only
    TRITON_INTERPRET=1 python -m bench.kernels.long --smoke [--sparse-only]     # toy sizes on a CPU
"""

from __future__ import annotations

import json
import time

import torch

from bench import common
from bench.common import RESULTS_DIR, log
from bench.kernels import attention as bk
from bench.kernels.attention import RESULTS
from bench.kernels.inputs import density_lists, sdpa_flash
from bench.kernels.smollm2_pack import smollm2_capture, smollm2_weights
from retrogram.kernels import testing as kt
from retrogram.kernels.block_sparse import block_sparse_attention, sampled_block_mass, topp_block_list, topp_block_list_naive
from retrogram.kernels.block_sparse_prefill import (block_sparse_prefill, mass_vertical_slash_scores,
                                                    vertical_slash_blocks, vs_pattern)
from retrogram.kernels.flash_prefill import flash_prefill
from retrogram.kernels.hip_attention import hip_attention_prefill, prefill_kend

BS = 64
RECALL_BOUND = 0.95               # the bound on the mean attention-mass recall
TOP_PS = (0.9, 0.95, 0.96, 0.97, 0.98)  # top-p of the estimated mass; recall lands a little under it
# HiP with 128-row query blocks (one list per 128 queries; the attention core then runs 128-row tiles, as
# flash_prefill does): coarser lists, half the estimator's sampled rows; "k128" also 128-key blocks (the
# 128 x 128 tiles flash_prefill runs)
Q128_TOP_PS = (0.95, 0.955, 0.96, 0.97)
# variant name -> (sampled rows per 128-row block, key block size, local blocks)
Q128_ROWS = {"hip128": (4, 64, 4), "hip128r2": (2, 64, 4), "hip128k128": (4, 128, 2)}
LONG: dict = {"smollm2": [], "projected_32x128": [], "checks": [], "errors": []}
# SmolLM2's own block lists of the 128-row variants, kept for timing the 32-head shape on real sparsity
# patterns: (T, variant, top_p) -> per captured layer (block_idx, block_cnt) of REAL_LIST_HEADS, on the CPU
REAL_LISTS: dict = {}
REAL_LIST_HEADS = (0, 3, 5, 8)  # 4 of SmolLM2's 9 query heads x 8 captured layers = the 32 heads timed


# ----------------------------------------------------------------------------------------------
def exact_block_mass(q, k, qbs, chunk=8):
    """Exact attention mass per key block, mean over each query block's rows: [H, len(qbs), nkb] float32.
    q: [T, H, D]; k: [S, HKV, D] (bottom-right causal)."""
    T, H, D = q.shape
    S, HKV, _ = k.shape
    nkb = -(-S // BS)
    kk = k.float().repeat_interleave(H // HKV, 1).transpose(0, 1)  # [H, S, D]
    out = torch.zeros(H, len(qbs), nkb, device=q.device)
    keys = torch.arange(S, device=q.device)
    for i, qb in enumerate(qbs):
        t0, t1 = qb * BS, min(T, qb * BS + BS)
        s = torch.einsum("thd,hsd->hts", q[t0:t1].float(), kk) * D**-0.5
        pos = torch.arange(t0, t1, device=q.device) + S - T
        s = s.masked_fill(keys[None, :] > pos[:, None], float("-inf"))
        p = torch.nn.functional.pad(torch.softmax(s, -1), (0, nkb * BS - S))
        out[:, i] = p.view(H, t1 - t0, nkb, BS).sum(-1).mean(1)
    return out


def block_stats(P, qbs, bi, bc, nvis_all):
    """Recall (exact mass on the kept blocks, at the sampled query blocks) and density (kept / visible
    blocks over all query blocks and heads) of block lists bi [H, NQB, MAXK], bc [H, NQB]."""
    H, n, nkb = P.shape
    sub_i, sub_c = bi[:, qbs].long(), bc[:, qbs]
    keep = torch.zeros(H, n, nkb + 1, dtype=torch.bool, device=P.device)
    idx = torch.where(torch.arange(sub_i.shape[-1], device=P.device) < sub_c[..., None], sub_i, nkb)
    keep.scatter_(-1, idx, True)
    rec = (P * keep[..., :nkb]).sum(-1)  # [H, n]
    return {"recall": rec.mean().item(), "recall_min_head": rec.mean(1).min().item(),
            "recall_p10_block": rec.flatten().kthvalue(max(1, rec.numel() // 10)).values.item(),
            "density": bc.float().sum().item() / (nvis_all.float().sum().item() * H)}


def bench_ms(fn, rep=60):
    return common.gpu_ms(fn, rep=rep, warmup=10)


def smollm2_section(pack_path, lens, layer_step, n_qb, dev):
    pack = torch.load(pack_path)
    c = pack["config"]
    w = smollm2_weights(pack, dev, torch.bfloat16 if dev == "cuda" else torch.float32)
    keep = list(range(0, c["n_layers"], layer_step))
    LONG["smollm2_config"] = {**c, "captured_layers": keep, "tokens_available": int(pack["ids"].numel())}
    log(f"SmolLM2 pack: {c['n_layers']} of {c['n_layers_model']} layers, capture {keep}")
    from retrogram.kernels.hf import HIP_DEFAULTS, VS_DEFAULTS

    hip_kw = {k: HIP_DEFAULTS[k] for k in ("n_sink", "n_local", "sample_rows")}
    vs_kw = {k: VS_DEFAULTS[k] for k in ("last_q", "n_vertical", "n_slash", "n_sink", "n_local", "sample_rows")}
    for T in lens:
        t0 = time.time()
        ids = pack["ids"][:T].to(dev)
        factor = max(1.0, T / 8192)
        with torch.no_grad():
            caps = smollm2_capture(pack, w, ids, keep, factor)
        nqb = -(-T // BS)
        qbs = sorted({int(x) for x in torch.linspace(0, nqb - 1, n_qb).round()})
        kend = prefill_kend(T, T, BS, True, dev)
        nvis = (kend + BS - 1) // BS
        log(f"T={T} RoPE x{factor:.0f}: captured in {time.time() - t0:.1f}s")
        for li, (q, k, v) in caps.items():
            row = {"T": T, "layer": li, "rope_linear_factor": factor}
            P = exact_block_mass(q, k, qbs)
            srt = P.sort(-1, descending=True).values.cumsum(-1)
            nv = nvis[qbs].float()[None]
            row["oracle95_density_sampled"] = (((srt < 0.95).sum(-1) + 1).float() / nv).mean().item()
            qq, kk, vv = q[None], k[None], v[None]
            sel = {}
            for tp in TOP_PS:
                _, (bi, bc) = hip_attention_prefill(qq, kk, vv, dense_below=0, estimator="mass", top_p=tp,
                                                    return_blocks=True, **hip_kw)
                sel[f"hip_mass_p{tp}"] = block_stats(P, qbs, bi[0], bc[0], nvis)
                bi, bc = vertical_slash_blocks(qq, kk, estimator="mass", top_p=tp, **vs_kw)
                sel[f"vs_mass_p{tp}"] = block_stats(P, qbs, bi[0], bc[0], nvis)
            for name, (rows, bkk, nloc) in Q128_ROWS.items():
                for tp in Q128_TOP_PS:   # lists of 128-row blocks, scored at the 64 x 64 blocks they cover
                    _, (bi, bc) = hip_attention_prefill(qq, kk, vv, dense_below=0, estimator="mass", top_p=tp,
                                                        block_size_q=128, block_size_k=bkk, return_blocks=True,
                                                        **{**hip_kw, "sample_rows": rows, "n_local": nloc})
                    heads = [h for h in REAL_LIST_HEADS if h < bi.shape[1]]
                    REAL_LISTS.setdefault((T, name, tp), []).append((bi[0, heads].cpu(), bc[0, heads].cpu()))
                    if bkk == 2 * BS:  # 128-key block kb -> 64-key blocks 2kb, 2kb + 1
                        bi = torch.stack([2 * bi, 2 * bi + 1], -1).flatten(-2)
                        bc = 2 * bc
                    bi64, bc64 = (x[0].repeat_interleave(2, dim=1)[:, :nqb] for x in (bi, bc))
                    sel[f"{name}_mass_p{tp}"] = block_stats(P, qbs, bi64, bc64, nvis)
            bi, bc = vertical_slash_blocks(qq, kk, estimator="last_q", **vs_kw)
            sel["vs_last_q"] = block_stats(P, qbs, bi[0], bc[0], nvis)
            row["selections"] = sel
            # time on this layer's real q/k/v
            qs = q.transpose(0, 1)[None]
            ks = k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(0, 1)[None].contiguous()
            vs = v.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(0, 1)[None].contiguous()
            o = torch.empty_like(qq)
            tm = {"sdpa": bench_ms(lambda: sdpa_flash(qs, ks, vs, True)),
                  "flash_prefill": bench_ms(lambda: flash_prefill(qq, kk, vv, causal=True, out=o)),
                  "hip_mass": bench_ms(lambda: hip_attention_prefill(qq, kk, vv, dense_below=0, estimator="mass",
                                                                     top_p=0.95, out=o, **hip_kw)),
                  "vs_mass": bench_ms(lambda: block_sparse_prefill(qq, kk, vv, dense_below=0, top_p=0.95, out=o,
                                                                   **vs_kw))}
            row["ms"] = tm
            del qs, ks, vs, o
            LONG["smollm2"].append(row)
            h, s_ = sel["hip_mass_p0.95"], sel["vs_mass_p0.95"]
            log(f"  T={T} L{li:>2}: oracle {row['oracle95_density_sampled']:.3f} | hip p.95 rec {h['recall']:.3f} "
                f"dens {h['density']:.3f} | vs p.95 rec {s_['recall']:.3f} dens {s_['density']:.3f} | vs last_q rec "
                f"{sel['vs_last_q']['recall']:.3f} dens {sel['vs_last_q']['density']:.3f} | ms sdpa {tm['sdpa']:.2f} "
                f"flash {tm['flash_prefill']:.2f} hip {tm['hip_mass']:.2f} vs {tm['vs_mass']:.2f}")
        del caps


def summarize_smollm2():
    out = {}
    for T in sorted({r["T"] for r in LONG["smollm2"]}):
        rows = [r for r in LONG["smollm2"] if r["T"] == T]
        s = {"layers": [r["layer"] for r in rows],
             "oracle95_density": sum(r["oracle95_density_sampled"] for r in rows) / len(rows)}
        for key in rows[0]["selections"]:
            xs = [r["selections"][key] for r in rows]
            s[key] = {"recall_mean": sum(x["recall"] for x in xs) / len(xs),
                      "recall_min_layer": min(x["recall"] for x in xs),
                      "density_mean": sum(x["density"] for x in xs) / len(xs),
                      "density_max_layer": max(x["density"] for x in xs)}
        for m in rows[0]["ms"]:
            s[f"{m}_ms_sum"] = sum(r["ms"][m] for r in rows)
        for name, tps in (("hip", TOP_PS), ("vs", TOP_PS), *((n, Q128_TOP_PS) for n in Q128_ROWS)):
            # the smallest top-p whose mean recall meets the bound (else the largest)
            keys = [f"{name}_mass_p{tp}" for tp in tps]
            s[f"{name}_at_bound"] = next((key for key in keys if s[key]["recall_mean"] >= RECALL_BOUND), keys[-1])
        s["hip_mass_x_sdpa"] = s["sdpa_ms_sum"] / s["hip_mass_ms_sum"]
        s["vs_mass_x_sdpa"] = s["sdpa_ms_sum"] / s["vs_mass_ms_sum"]
        out[str(T)] = s
    LONG["smollm2_summary"] = out
    return out


def projected_section(summary, H=32, D=128, stats=("density_mean", "density_max_layer")):
    """The issue's shape at the densities SmolLM2 needs (mean over the captured layers): the estimator and
    the selection run for real on random data; the attention on block lists of that density."""
    for Ts, s in summary.items():
        T = int(Ts)
        q, k, v = bk.rnd(1, T, H, D), bk.rnd(1, T, H, D), bk.rnd(1, T, H, D)
        qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        sdpa = bench_ms(lambda: sdpa_flash(qs, ks, vs, True), rep=100)
        del qs, ks, vs
        kend = prefill_kend(T, T, BS, True, bk.DEV)
        row = {"T": T, "H": H, "D": D, "sdpa_ms": sdpa}
        o = torch.empty_like(q)
        row["flash_prefill_ms"] = bench_ms(lambda: flash_prefill(q, k, v, causal=True, out=o), rep=100)
        row["estimate_ms"] = bench_ms(lambda: sampled_block_mass(q, k, BS, BS, 4))
        mass = sampled_block_mass(q, k, BS, BS, 4)
        row["topp_ms"] = bench_ms(lambda: topp_block_list(mass, kend, BS, 0.95, 1, 4))
        row["topp_naive_ms"] = bench_ms(lambda: topp_block_list_naive(mass, kend, BS, 0.95, 1, 4))
        row["vs_scores_ms"] = bench_ms(lambda: mass_vertical_slash_scores(mass, T, T, BS, BS))
        vert, slash = mass_vertical_slash_scores(mass, T, T, BS, BS)
        row["vs_pattern_ms"] = bench_ms(lambda: vs_pattern(vert, slash, T, T, BS, BS, 32, 16, 1, 2))
        cand = vs_pattern(vert, slash, T, T, BS, BS, 32, 16, 1, 2)
        row["vs_topp_ms"] = bench_ms(lambda: topp_block_list(mass, kend, BS, 0.95, 1, 2, extra_idx=cand))

        def vs_sel():  # vertical_slash_blocks after the estimator
            vert, slash = mass_vertical_slash_scores(mass, T, T, BS, BS)
            cand = vs_pattern(vert, slash, T, T, BS, BS, 32, 16, 1, 2)
            return topp_block_list(mass, kend, BS, 0.95, 1, 2, extra_idx=cand)

        row["vs_select_ms"] = bench_ms(vs_sel)
        del mass, vert, slash, cand

        def on_lists(bi, bc, select_ms, bq, kend_q, bkk):
            """The attention on block lists bi, bc: its density, time, and the total with the selection."""
            attn = bench_ms(lambda: block_sparse_attention(q, k, v, bi, bc, bq, bkk, out=o), rep=100)
            got = bc.float().sum().item() / (((kend_q + bkk - 1) // bkk).float().sum().item() * H)
            tot = select_ms + attn
            return {"density": got, "attn_ms": attn, "total_ms": tot, "x_sdpa": sdpa / tot,
                    "attn_vs_flash_at_density": attn / (got * row["flash_prefill_ms"])}

        def at_densities(name, dkey, select_ms, bq, kend_q, bkk=BS, n_local=4):
            """The attention on block lists of the selection's densities: row[name_stat] per stat."""
            row[f"{name}_selection"]["key"] = dkey
            row[f"{name}_selection"]["recall_mean"] = s[dkey].get("recall_mean")
            for stat in stats:
                d = s[dkey][stat]
                # density_lists keeps a fraction of the visible blocks plus 1 sink + n_local local ones
                bi, bc = density_lists(T, H, max(0.0, d), n_local=n_local, dev=bk.DEV, block_size_q=bq,
                                       block_size_k=bkk)
                row[f"{name}_{stat}"] = {"target_density": d, **on_lists(bi, bc, select_ms, bq, kend_q, bkk)}
                # the same lists with the K/V tiles loaded by pointers instead of TMA (the default on Hopper)
                row[f"{name}_{stat}"]["attn_ms_pointer_loads"] = bench_ms(
                    lambda: block_sparse_attention(q, k, v, bi, bc, bq, bkk, out=o, tma=False), rep=100)
                del bi, bc

        kend128 = prefill_kend(T, T, 128, True, bk.DEV)
        for name, (rows, bkk, nloc) in Q128_ROWS.items():
            if f"{name}_at_bound" not in s:
                continue
            est = bench_ms(lambda: sampled_block_mass(q, k, 128, bkk, rows))
            mass = sampled_block_mass(q, k, 128, bkk, rows)
            sel_ms = bench_ms(lambda: topp_block_list(mass, kend128, bkk, 0.96, 1, nloc))
            del mass
            row[f"{name}_selection"] = {"estimate_ms": est, "select_ms": sel_ms}
            at_densities(name, s[f"{name}_at_bound"], est + sel_ms, 128, kend128, bkk, nloc)
            real = REAL_LISTS.get((T, name, float(s[f"{name}_at_bound"].rsplit("_p", 1)[1])))
            if real and sum(x[0].shape[0] for x in real) >= H:
                # SmolLM2's own lists (4 heads of each captured layer) on the 32 heads: the sparsity
                # pattern the selection really produces (vertical stripes shared by neighbouring query
                # blocks), where the random lists of at_densities share nothing
                maxk = max(x[0].shape[-1] for x in real)
                bi = torch.cat([torch.nn.functional.pad(x[0], (0, maxk - x[0].shape[-1])) for x in real])[None, :H]
                bc = torch.cat([x[1] for x in real])[None, :H]
                bi, bc = bi.to(bk.DEV), bc.to(bk.DEV)
                row[f"{name}_real_lists"] = {**on_lists(bi, bc, est + sel_ms, 128, kend128, bkk),
                                             "heads": f"SmolLM2 layers {LONG['smollm2_config']['captured_layers']} "
                                                      f"x query heads {list(REAL_LIST_HEADS)}"}
                del bi, bc
        for name, sel_ms in (("hip", row["topp_ms"]), ("vs", row["vs_select_ms"])):
            row[f"{name}_selection"] = {}
            at_densities(name, s.get(f"{name}_at_bound", f"{name}_mass_p0.95"), row["estimate_ms"] + sel_ms, BS, kend)
        LONG["projected_32x128"].append(row)
        log(f"32x128 T={T}: sdpa {sdpa:.1f} ms, flash_prefill {row['flash_prefill_ms']:.1f}, estimate {row['estimate_ms']:.2f}, "
            f"top-p {row['topp_ms']:.2f} (sort-based {row['topp_naive_ms']:.2f}), vs select {row['vs_select_ms']:.2f} "
            f"(scores {row['vs_scores_ms']:.2f} pattern {row['vs_pattern_ms']:.2f} top-p {row['vs_topp_ms']:.2f}) | "
            f"hip at {row['hip_density_mean']['density']:.3f}: {row['hip_density_mean']['total_ms']:.1f} ms "
            f"({row['hip_density_mean']['x_sdpa']:.1f}x) | vs at {row['vs_density_mean']['density']:.3f}: "
            f"{row['vs_density_mean']['total_ms']:.1f} ms ({row['vs_density_mean']['x_sdpa']:.1f}x)")
        del q, k, v, o


def projected_table():
    log("32 heads x 128, bf16, causal, at the measured mean densities (ms; x = SDPA / total):")
    log("      T |  SDPA | flash | estimate | HiP select | HiP attn (dens) | HiP total (x) | VS select | "
        "VS attn (dens) | VS total (x) | attn / (dens x flash)")
    for r in LONG["projected_32x128"]:
        h, v = r["hip_density_mean"], r["vs_density_mean"]
        log(f"        HiP {r['hip_selection']}, VS {r['vs_selection']}")
        for name in Q128_ROWS:
            if f"{name}_density_mean" in r:
                h8, sel = r[f"{name}_density_mean"], r[f"{name}_selection"]
                log(f"        HiP 128-row blocks, {Q128_ROWS[name][0]} rows, {Q128_ROWS[name][1]}-key blocks, {sel['key']} recall {sel['recall_mean']:.4f}: "
                    f"estimate {sel['estimate_ms']:.2f}, select {sel['select_ms']:.2f}, attn {h8['attn_ms']:.1f} "
                    f"({h8['density']:.3f}; pointer loads {h8.get('attn_ms_pointer_loads', float('nan')):.1f}), total "
                    f"{h8['total_ms']:.1f} ({h8['x_sdpa']:.2f}x), "
                    f"attn / (dens x flash) {h8['attn_vs_flash_at_density']:.2f}")
                if f"{name}_real_lists" in r:
                    rl = r[f"{name}_real_lists"]
                    log(f"          on SmolLM2's own lists (density {rl['density']:.3f}): attn {rl['attn_ms']:.1f}, total "
                        f"{rl['total_ms']:.1f} ({rl['x_sdpa']:.2f}x), attn / (dens x flash) "
                        f"{rl['attn_vs_flash_at_density']:.2f}")
        log(f"{r['T']:>7} | {r['sdpa_ms']:5.1f} | {r['flash_prefill_ms']:5.1f} | {r['estimate_ms']:8.2f} | "
            f"{r['topp_ms']:10.2f} | {h['attn_ms']:6.1f} ({h['density']:.3f}) | {h['total_ms']:6.1f} ({h['x_sdpa']:.2f}x) | "
            f"{r['vs_select_ms']:9.2f} | {v['attn_ms']:5.1f} ({v['density']:.3f}) | {v['total_ms']:5.1f} ({v['x_sdpa']:.2f}x) | "
            f"{h['attn_vs_flash_at_density']:.2f} / {v['attn_vs_flash_at_density']:.2f}")


def sparse_checks(H=8, D=128, small=kt.MASS_SMALL_T, big=kt.MASS_BIG_T, HQ=32, f=1):
    """The selection kernels against their references on the GPU (bf16 q/k for the estimator; the
    selection on its float32 mass): max abs error of the mass and the scores, and the fraction of
    (head, query block) rows whose top-p block list differs from the sort-based reference (ties only)."""
    for c in kt.selection_checks(small, big, f, bk.DEV, bk.BF16, H=H, HQ=HQ, D=D):
        name = f"{c.kernel} T={c.info['T']}" if "T" in c.info else c.kernel
        LONG["checks"].append({"name": name, "value": c.err, "ok": c.ok, **c.info})
        log(f"check {name}: {c.err:.3g} {'ok' if c.ok else 'FAIL'} {c.info}")


def dump(args, bench="kernels_long"):
    """The results so far (a run cut short still reports what it did); a smoke run writes only with --out."""
    if args.smoke and args.out is None:
        return
    common.save(bench if not args.smoke else bench + "_smoke", LONG, out=args.out, tag=args.tag)


def gpu_line() -> str:
    import triton

    return (f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs, "
            f"torch {torch.__version__}, triton {triton.__version__}")


def guarded(name, fn, *a):
    return common.guarded(LONG["errors"], name, fn, *a)


def main():
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--pack", default=".smollm2-carry/pack.pt", help="written by bench.kernels.smollm2_pack")
    ap.add_argument("--lens", type=int, nargs="*", default=[32768, 65536, 131072])
    ap.add_argument("--layer-step", type=int, default=3)
    ap.add_argument("--qblocks", type=int, default=64)
    ap.add_argument("--skip-main", action="store_true", help="not bench.kernels.attention's sections")
    ap.add_argument("--smoke", action="store_true", help="CPU (Triton interpreter), tiny sizes")
    ap.add_argument("--sparse-only", action="store_true", help="selection checks + section 2 at the recorded densities")
    ap.add_argument("--densities", default=str(RESULTS_DIR / "kernels_long_h200.json"),
                    help="results of an earlier run whose SmolLM2 densities --sparse-only times")
    common.add_output_args(ap)
    args = ap.parse_args()
    common.check_kernel_device(ap, args.smoke)
    t0 = time.time()
    if args.sparse_only:
        with open(args.densities) as f:
            recorded = json.load(f)["smollm2_summary"]
        summary = {Ts: {key: val for key, val in recorded[Ts].items() if key.endswith("_at_bound") or key.startswith(
                   ("hip_mass_p", "vs_mass_p", *(f"{n}_mass_p" for n in Q128_ROWS)))} for Ts in recorded
                   if int(Ts) in args.lens}
        if args.smoke:
            bk.DEV, bk.BF16 = "cpu", torch.float32
            summary = {"1024": next(iter(summary.values()))}
            guarded("checks", sparse_checks, 2, 32, (300,), (1024,), 4, 10)
            guarded("projected", projected_section, summary, 2, 32, ("density_mean",))
        else:
            log(gpu_line())
            guarded("checks", sparse_checks)
            dump(args, "kernels_sparse")
            guarded("projected", projected_section, summary, 32, 128, ("density_mean",))
        LONG["wall_s"] = time.time() - t0
        dump(args, "kernels_sparse")
        projected_table()
        log(f"errors: {len(LONG['errors'])}; checks failed: {sum(not c['ok'] for c in LONG['checks'])}; "
            f"wall {time.time() - t0:.0f}s")
        return
    if args.smoke:
        bk.DEV, bk.BF16 = "cpu", torch.float32
        guarded("smollm2", smollm2_section, args.pack, [1024], 11, 4, "cpu")
        summary = guarded("summary", summarize_smollm2) or {}
        guarded("projected", projected_section, summary, 2, 32)
        log(json.dumps(summary, indent=1)[:3000], LONG["projected_32x128"], LONG["errors"])
        return
    LONG["sms"] = RESULTS["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    log(gpu_line())
    guarded("smollm2", smollm2_section, args.pack, args.lens, args.layer_step, args.qblocks, "cuda")
    summary = guarded("summary", summarize_smollm2) or {}
    dump(args)
    guarded("projected", projected_section, summary)
    LONG["wall_s_long"] = time.time() - t0
    dump(args)
    if not args.skip_main:
        bk.ceilings()
        q = bk.rnd(1, 16384, 32, 128)
        flash_prefill(q, q, q, causal=True)  # autotune on a mid-size problem first
        del q
        bk.checks()
        lens = [4096, 8192, 16384, 32768, 65536, 131072]
        bk.prefill(lens)
        bk.sparse_prefill([32768, 131072])
        bk.decode([32768, 131072])
        bk.cca()
        RESULTS["wall_s"] = time.time() - t0
    log("\n=== SmolLM2 real attention (mean over captured layers) ===")
    log("      T | oracle.95 | HiP p.95 recall/min/dens | VS p.95 recall/min/dens | VS last_q rec/dens | "
        "layer ms sum: SDPA / HiP (x) / VS (x)")
    for Ts, s in summary.items():
        for name in ("hip", "vs", *Q128_ROWS):
            b = s[s[f"{name}_at_bound"]]
            log(f"{int(Ts):>7} {name} at the recall bound: {s[f'{name}_at_bound']} recall {b['recall_mean']:.3f} "
                f"(worst layer {b['recall_min_layer']:.3f}) density {b['density_mean']:.3f}")
        h, v, vl = s["hip_mass_p0.95"], s["vs_mass_p0.95"], s["vs_last_q"]
        log(f"{int(Ts):>7} | {s['oracle95_density']:9.3f} | {h['recall_mean']:.3f}/{h['recall_min_layer']:.3f}/"
            f"{h['density_mean']:.3f}       | {v['recall_mean']:.3f}/{v['recall_min_layer']:.3f}/{v['density_mean']:.3f}"
            f"      | {vl['recall_mean']:.3f}/{vl['density_mean']:.3f}      | {s['sdpa_ms_sum']:.1f} / "
            f"{s['hip_mass_ms_sum']:.1f} ({s['hip_mass_x_sdpa']:.1f}x) / {s['vs_mass_ms_sum']:.1f} ({s['vs_mass_x_sdpa']:.1f}x)")
    log("32 heads x 128 at those densities: T | SDPA ms | HiP ms (x) | VS ms (x)")
    for r in LONG["projected_32x128"]:
        log(f"{r['T']:>35} | {r['sdpa_ms']:7.1f} | {r['hip_density_mean']['total_ms']:6.1f} "
            f"({r['hip_density_mean']['x_sdpa']:.1f}x) | {r['vs_density_mean']['total_ms']:6.1f} ({r['vs_density_mean']['x_sdpa']:.1f}x)")
    projected_table()
    if not args.skip_main:
        bk.table()
    log(f"errors: {len(LONG['errors'])} long, {len(RESULTS['errors'])} main; wall {time.time() - t0:.0f}s")
    LONG["wall_s"] = time.time() - t0
    dump(args)
    if not args.skip_main:
        common.save("kernels", RESULTS, out=args.out, tag=args.tag)


if __name__ == "__main__":
    main()
