"""GPU run for the adaptive ("mass") HiP prefill estimator and the flash_decode launch tuning.

1. correctness on the GPU: sampled_block_mass against its float64 reference, HiP "mass" prefill against
   the block-sparse reference, every decode configuration of the sweep against the default one;
2. sparse prefill at 32k..128k (32 heads x 128, bf16, causal) next to SDPA flash: the estimator
   (sampled rows 2 / 4), the top-p selection, the block-sparse attention at fixed densities (the time
   any selection reaching that density costs), and end-to-end HiP "mass" prefill with a block cap
   (random data has flat attention, so the cap binds: the worst case for that cap);
3. flash_decode: sweep of (num_warps, num_stages, waves, block_n) per shape class, the best installed,
   then the decode section of bench_kernels.py with it.
Writes $OUT/kernels_mass_h200.json.   python bench/bench_kernels_mass.py [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402
from bench_kernels import RESULTS, bench_ms, guarded, log, poisoned, rel, rnd  # noqa: E402

from retrogram.kernels.block_sparse import (block_sparse_attention, block_sparse_attention_naive,  # noqa: E402
                                            sampled_block_mass, sampled_block_mass_naive, topp_block_list)
from retrogram.kernels.hip_attention import hip_attention_prefill, prefill_kend  # noqa: E402

RESULTS["mass"] = []


@guarded("mass_checks")
def mass_checks(f=1):
    torch.manual_seed(1)
    B, T, HQ, HKV, D = 1, 2000 // f, 8, 2, 128
    q, k = rnd(B, T, HQ, D), rnd(B, T, HKV, D)
    m = sampled_block_mass(q, k, 64, 64, 4)
    ref = sampled_block_mass_naive(q, k, 64, 64, 4)
    err = (m.double().cpu() - ref).abs().max().item()
    bk.check("sampled_block_mass", err, tol=2e-2, shape=[B, T, HQ, HKV, D], note="max abs error of block mass")
    T = 4096 // f
    q, k, v = rnd(1, T, HQ, D), rnd(1, T, HKV, D), rnd(1, T, HKV, D)
    o, (bi, bc) = hip_attention_prefill(q, k, v, dense_below=0, estimator="mass", top_p=0.9, n_local=2, return_blocks=True,
                                        out=poisoned(q.shape))
    ref = block_sparse_attention_naive(q.double(), k.double(), v.double(), bi, bc, 64, 64)
    bk.check("hip_prefill mass", rel(o, ref), blocks_mean=bc.float().mean().item())


def density_lists(T, H, d, n_sink=1, n_local=4, dev="cuda", block_size_q=64, block_size_k=64):
    """Block lists keeping a fraction d of each query block's visible key blocks (random ones, plus
    sink/local)."""
    nqb, nkb = triton_cdiv(T, block_size_q), triton_cdiv(T, block_size_k)
    kend = prefill_kend(T, T, block_size_q, True, dev)
    nvis = (kend + block_size_k - 1) // block_size_k
    r = torch.rand(1, H, nqb, nkb, device=dev)
    kb = torch.arange(nkb, device=dev)
    vis = kb[None, :] < nvis[:, None]
    mass = torch.where(vis, r, 0.0)
    # a fraction d of the visible blocks: the d * nvis largest random values
    n = torch.clamp((d * nvis.float()).round().long(), min=1)
    srt = mass.sort(-1, descending=True).values
    thr = srt.gather(-1, (n - 1).view(1, 1, -1, 1).expand(1, H, nqb, 1))
    keep = (mass >= thr) & vis
    keep |= vis & ((kb < n_sink) | (kb >= nvis[:, None] - n_local))
    cnt = keep.sum(-1).to(torch.int32)
    idx = torch.where(keep, kb, 1 << 30).sort(-1).values[..., : int(cnt.max())]
    return torch.where(idx >= 1 << 30, 0, idx).to(torch.int32), cnt


def triton_cdiv(a, b):
    return -(-a // b)


@guarded("mass_prefill")
def mass_prefill(lens, H=32, D=128, densities=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4), caps=(64, 128, 256)):
    sdpa_ms = {r["T"]: r["sdpa_ms"] for r in RESULTS["prefill"]}
    for T in lens:
        q, k, v = rnd(1, T, H, D), rnd(1, T, H, D), rnd(1, T, H, D)
        if T not in sdpa_ms:
            qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            sdpa_ms[T] = bench_ms(lambda: bk.sdpa_flash(qs, ks, vs, True))
            fo = torch.empty_like(q)
            row_fl = bench_ms(lambda: bk.flash_prefill(q, k, v, causal=True, out=fo))
            del qs, ks, vs, fo
        else:
            row_fl = next(r["flash_ms"] for r in RESULTS["prefill"] if r["T"] == T)
        row = {"T": T, "H": H, "D": D, "sdpa_ms": sdpa_ms[T], "flash_ms": row_fl}
        kend = prefill_kend(T, T, 64, True, bk.DEV)
        for rows in (2, 4):
            row[f"estimate_rows{rows}_ms"] = bench_ms(lambda: sampled_block_mass(q, k, 64, 64, rows))
        mass = sampled_block_mass(q, k, 64, 64, 4)
        for cap in caps:
            row[f"topp_cap{cap}_ms"] = bench_ms(lambda: topp_block_list(mass, kend, 64, 0.95, 1, 4, max_blocks=cap))
        del mass
        torch.cuda.empty_cache() if bk.DEV == "cuda" else None
        o = torch.empty_like(q)
        row["attn_at_density"] = {}
        for d in densities:
            bi, bc = density_lists(T, H, d, dev=bk.DEV)
            ms = bench_ms(lambda: block_sparse_attention(q, k, v, bi, bc, 64, 64, out=o))
            dens = (bc.float().mean().item() * 64) / (T / 2)
            row["attn_at_density"][str(d)] = {"ms": ms, "density": dens}
            log(f"  T={T} attention at density {dens:.3f}: {ms:.2f} ms (SDPA {sdpa_ms[T]:.1f})")
            del bi, bc
        row["e2e"] = {}
        for cap in caps:
            ms = bench_ms(lambda: hip_attention_prefill(q, k, v, dense_below=0, estimator="mass", top_p=0.95,
                                                        max_blocks=cap, n_local=4, out=o))
            _, (bi, bc) = hip_attention_prefill(q, k, v, dense_below=0, estimator="mass", top_p=0.95, max_blocks=cap,
                                                n_local=4, return_blocks=True, out=o)
            dens = (bc.float().mean().item() * 64) / (T / 2)
            row["e2e"][str(cap)] = {"ms": ms, "density": dens, "speedup_vs_sdpa": sdpa_ms[T] / ms}
            log(f"  T={T} hip mass cap {cap}: {ms:.2f} ms, density {dens:.3f} -> {sdpa_ms[T] / ms:.1f}x SDPA")
            del bi, bc
        RESULTS["mass"].append(row)
        log(f"mass prefill T={T}: sdpa {sdpa_ms[T]:.1f} ms | estimate rows2 {row['estimate_rows2_ms']:.2f} rows4 "
            f"{row['estimate_rows4_ms']:.2f} ms | top-p {row[f'topp_cap{caps[0]}_ms']:.2f}..{row[f'topp_cap{caps[-1]}_ms']:.2f} ms")
        del q, k, v, o
        torch.cuda.empty_cache() if bk.DEV == "cuda" else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    if args.smoke:
        bk.DEV, bk.BF16 = "cpu", torch.float32
        RESULTS["env"] = {"device": "cpu"}
        mass_checks(f=16)
        mass_prefill([512], H=2, D=32, densities=(0.2,), caps=(2,))
        bk.decode_sweep(shapes=((1, 1024, 2, True),), H=4, D=32, grid=[(4, 2, 4, 16), (4, 2, 2, 16)])
        bk.decode([1024], batches=(1,), H=4, D=32, hkv_list=(2,), hip_cfg=dict(topk=2, n_sink=1, n_local=2))
    else:
        import triton
        RESULTS["env"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                          "cuda": torch.version.cuda, "sms": torch.cuda.get_device_properties(0).multi_processor_count}
        log(RESULTS["env"])
        def dump():
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "kernels_mass_h200.json"), "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)

        bk.ceilings()
        mass_checks()
        mass_prefill([32768, 131072])
        dump()
        torch.cuda.empty_cache()
        bk.decode_sweep(shapes=((8, 32768, 32, True), (8, 131072, 32, True), (1, 32768, 8, False), (1, 32768, 8, True),
                                (1, 32768, 32, False)),
                        grid=[(w, st, wv, bn) for bn in (64, 128) for w in (4, 8) for st in (2, 4) for wv in (4, 8)])
        dump()
        bk.decode([32768, 131072])
    RESULTS["wall_s"] = time.time() - t0
    log("\n=== summary ===")
    for r in RESULTS["mass"]:
        log(f"T={r['T']}: SDPA {r['sdpa_ms']:.1f} ms, flash {r['flash_ms']:.1f} ms, estimate r2/r4 "
            f"{r['estimate_rows2_ms']:.2f}/{r['estimate_rows4_ms']:.2f} ms; attention at density: "
            + ", ".join(f"{v['density']:.2f}:{v['ms']:.1f}" for v in r["attn_at_density"].values())
            + "; e2e cap: " + ", ".join(f"{c}:{v['ms']:.1f}ms/{v['density']:.3f}/{v['speedup_vs_sdpa']:.1f}x"
                                       for c, v in r["e2e"].items()))
    for r in RESULTS.get("decode_sweep", []):
        log(f"sweep B={r['B']} S={r['S']} HKV={r['HKV']} paged={r['paged']}: best {r['best']['cfg']} "
            f"{r['best']['TBps']:.2f} TB/s")
    log(f"chosen: {RESULTS.get('decode_configs_chosen')}")
    bk.table()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels_mass_h200.json" if not args.smoke else "kernels_mass_smoke.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
