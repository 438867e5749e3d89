"""GPU run for the adaptive ("mass") HiP prefill estimator and the flash_decode launch tuning (first session).

1. correctness on the GPU: sampled_block_mass against its float64 reference, HiP "mass" prefill against
   the block-sparse reference (retrogram.kernels.testing), every decode configuration of the sweep
   against the default one;
2. sparse prefill at 32k..128k (32 heads x 128, bf16, causal) next to SDPA flash: the estimator
   (sampled rows 2 / 4), the top-p selection, the block-sparse attention at fixed densities (the time
   any selection reaching that density costs), and end-to-end HiP "mass" prefill with a block cap
   (random data has flat attention, so the cap binds: the worst case for that cap);
3. flash_decode: sweep of (num_warps, num_stages, waves, block_n) per shape class, the best installed,
   then the decode section of bench.kernels.attention with it.
Results: kernels_mass_<tag>.json.

    python -m bench.kernels.mass
    TRITON_INTERPRET=1 python -m bench.kernels.mass --smoke
"""

from __future__ import annotations

import time

import torch

from bench import common
from bench.common import gpu_ms, log
from bench.kernels import attention as bk
from bench.kernels.attention import RESULTS, guarded, rnd
from bench.kernels.inputs import density_lists
from retrogram.kernels import testing as kt
from retrogram.kernels.block_sparse import block_sparse_attention, sampled_block_mass, topp_block_list
from retrogram.kernels.flash_prefill import flash_prefill
from retrogram.kernels.hip_attention import hip_attention_prefill, prefill_kend

RESULTS["mass"] = []


@guarded("mass_checks")
def mass_checks(f=1):
    bk.record(kt.check_sampled_block_mass(2000, f=f, device=bk.DEV, dtype=bk.BF16))
    bk.record(kt.check_hip_prefill_mass(4096, 0.9, 2, f=f, device=bk.DEV, dtype=bk.BF16))


@guarded("mass_prefill")
def mass_prefill(lens, H=32, D=128, densities=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4), caps=(64, 128, 256)):
    sdpa_ms = {}
    for T in lens:
        q, k, v = rnd(1, T, H, D), rnd(1, T, H, D), rnd(1, T, H, D)
        sdpa_ms[T] = bk.sdpa_causal_ms(q, k, v)
        row_fl = next((r["flash_ms"] for r in RESULTS["prefill"] if r["T"] == T), None)
        if row_fl is None:
            fo = torch.empty_like(q)
            row_fl = gpu_ms(lambda: flash_prefill(q, k, v, causal=True, out=fo))
            del fo
        row = {"T": T, "H": H, "D": D, "sdpa_ms": sdpa_ms[T], "flash_ms": row_fl}
        kend = prefill_kend(T, T, 64, True, bk.DEV)
        for rows in (2, 4):
            row[f"estimate_rows{rows}_ms"] = gpu_ms(lambda: sampled_block_mass(q, k, 64, 64, rows))
        mass = sampled_block_mass(q, k, 64, 64, 4)
        for cap in caps:
            row[f"topp_cap{cap}_ms"] = gpu_ms(lambda: topp_block_list(mass, kend, 64, 0.95, 1, 4, max_blocks=cap))
        del mass
        torch.cuda.empty_cache() if bk.DEV == "cuda" else None
        o = torch.empty_like(q)
        row["attn_at_density"] = {}
        for d in densities:
            bi, bc = density_lists(T, H, d, dev=bk.DEV)
            ms = gpu_ms(lambda: block_sparse_attention(q, k, v, bi, bc, 64, 64, out=o))
            dens = (bc.float().mean().item() * 64) / (T / 2)
            row["attn_at_density"][str(d)] = {"ms": ms, "density": dens}
            log(f"  T={T} attention at density {dens:.3f}: {ms:.2f} ms (SDPA {sdpa_ms[T]:.1f})")
            del bi, bc
        row["e2e"] = {}
        for cap in caps:
            ms = gpu_ms(lambda: hip_attention_prefill(q, k, v, dense_below=0, estimator="mass", top_p=0.95,
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
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--smoke", action="store_true", help="CPU (Triton interpreter), tiny sizes")
    common.add_output_args(ap)
    args = ap.parse_args()
    common.check_kernel_device(ap, args.smoke)
    t0 = time.time()

    def dump():
        if not args.smoke or args.out is not None:
            common.save("kernels_mass" if not args.smoke else "kernels_mass_smoke", RESULTS, out=args.out, tag=args.tag)

    if args.smoke:
        bk.DEV, bk.BF16 = "cpu", torch.float32
        mass_checks(f=16)
        mass_prefill([512], H=2, D=32, densities=(0.2,), caps=(2,))
        bk.decode_sweep(shapes=((1, 1024, 2, True),), H=4, D=32, grid=[(4, 2, 4, 16), (4, 2, 2, 16)])
        bk.decode([1024], batches=(1,), H=4, D=32, hkv_list=(2,), hip_cfg=dict(topk=2, n_sink=1, n_local=2))
    else:
        RESULTS["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
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
    dump()


if __name__ == "__main__":
    main()
