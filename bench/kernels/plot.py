"""Plot bench/results/kernels_<tag>.json: time against sequence length per kernel, next to SDPA; with
kernels_long_<tag>.json beside it, also the sparse prefills at the densities SmolLM2 needs for top-p 0.95.
Writes kernels_<tag>.png beside the results (needs matplotlib).

    python -m bench.kernels.plot [--tag h200]
"""

import json

from bench.common import RESULTS_DIR, parser


def main():
    ap = parser(__doc__, __spec__)
    ap.add_argument("--tag", default="h200", help="machine tag of the results to plot")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = RESULTS_DIR / f"kernels_{args.tag}.json"
    dst = src.with_suffix(".png")
    r = json.loads(src.read_text())
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
    long_path = RESULTS_DIR / f"kernels_long_{args.tag}.json"
    if long_path.is_file():
        pr = json.loads(long_path.read_text())["projected_32x128"]
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
    st = r["stamp"]
    fig.suptitle(f"{st['gpu']}, torch {st['versions']['torch']}, triton {st['versions']['triton']}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print("wrote", dst)


if __name__ == "__main__":
    main()
