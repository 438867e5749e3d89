"""Plot bench/results/kernels_h200.json: time against sequence length per kernel, next to SDPA; with
kernels_long_h200.json beside it, also the sparse prefills at the densities SmolLM2 needs for top-p 0.95.

    python bench/bench_kernels_plot.py [results.json] [out.png]     (needs matplotlib)
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "kernels_h200.json")
    dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "results", "kernels_h200.png")
    r = json.load(open(src))
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    pf = r["prefill"]
    a.plot([x["T"] for x in pf], [x["sdpa_ms"] for x in pf], "o-", label="SDPA flash (dense)")
    a.plot([x["T"] for x in pf], [x["flash_ms"] for x in pf], "s-", label="flash_prefill (dense)")
    for key, lab in (("hip_prefill", "hip prefill"), ("vs_prefill", "vertical-slash prefill")):
        for label in dict.fromkeys(x.get("label", "") for x in r[key]):
            if "default" in label:  # top-p on random (flat) attention keeps ~94% of blocks: not a real case
                continue
            rows = [x for x in r[key] if x.get("label", "") == label]
            a.plot([x["T"] for x in rows], [x["total_ms"] for x in rows], "v:", label=f"{lab} {label} (random data, fixed budget)")
    long_path = os.path.join(os.path.dirname(src), "kernels_long_h200.json")
    if os.path.exists(long_path):
        pr = json.load(open(long_path))["projected_32x128"]
        for key, lab in (("hip_density_mean", "hip prefill, mass top-p 0.95"), ("vs_density_mean", "vertical-slash prefill, mass top-p 0.95")):
            dens = ", ".join(f"{x[key]['density']:.2f}" for x in pr)
            a.plot([x["T"] for x in pr], [x[key]["total_ms"] for x in pr], "^-", label=f"{lab} at SmolLM2's density ({dens})")
    a.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="ms (median)",
          title="prefill, causal bf16, 32 heads x 128, batch 1")
    a.set_xticks([x["T"] for x in pf], [f"{x['T'] // 1024}k" for x in pf])
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    for B, style in ((1, "-"), (8, "--")):
        rows = [x for x in r["decode"] if x["B"] == B and x["HKV"] == 32]
        S = [x["S"] for x in rows]
        b.plot(S, [x["sdpa_graph_ms"] * 1e3 for x in rows], "o" + style, label=f"SDPA flash, batch {B}")
        b.plot(S, [x["flash_graph_ms"] * 1e3 for x in rows], "s" + style, label=f"flash_decode, batch {B}")
        b.plot(S, [x["paged_graph_ms"] * 1e3 for x in rows], "d" + style, label=f"flash_decode paged, batch {B}")
        b.plot(S, [x["hip_amortized_graph_ms"] * 1e3 for x in rows], "^" + style, label=f"hip decode (amortised), batch {B}")
    b.set(xscale="log", yscale="log", xlabel="KV length (tokens)", ylabel="us per step (median, CUDA graph)",
          title="decode, one query token, 32 heads x 128 (MHA)")
    b.grid(True, which="both", alpha=0.3)
    b.legend(fontsize=8)
    env = r["env"]
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print("wrote", dst)


if __name__ == "__main__":
    main()
