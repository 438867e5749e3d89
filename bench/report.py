"""The tables of BENCHMARKS.md, rendered from the results files in bench/results/.

Each block `<!-- table:NAME -->` ... `<!-- /table -->` in BENCHMARKS.md is replaced by the table of NAME (a
results file's stem such as `kernels_h200`, or `stem:view` for a second table of the same file), drawn by the
function registered below for that file's bench (`@table("kernels")`, `@table("kernels:random")`: any machine's
file), followed by the file's stamp (machine, GPU, versions, commit); the prose around the blocks is left as it
is. Every results file has at least one block.

    python -m bench.report            # rewrite the tables in BENCHMARKS.md
    python -m bench.report --check    # exit 1 when BENCHMARKS.md differs from what the results render
"""

from __future__ import annotations

import decimal
import difflib
import json
import re
import sys
from pathlib import Path

from bench.common import REPO, RESULTS_DIR, parser

BENCHMARKS = REPO / "BENCHMARKS.md"
BLOCK = re.compile(r"<!-- table:(\S+) -->\n.*?<!-- /table -->", re.S)
TABLES: dict = {}   # bench[:view] -> function(results dict) -> markdown lines
# figures round half up from their shortest decimal form (0.9205 -> 0.921), as they were written by hand
decimal.getcontext().rounding = decimal.ROUND_HALF_UP


def dec(x):
    return decimal.Decimal(repr(x)) if isinstance(x, float) else x


def table(name: str):
    """Register the table of a bench's results file (any machine), or a second view of it (bench:view)."""
    def register(fn):
        TABLES[name] = fn
        return fn
    return register


def md(header: list[str], rows: list[list], align: str) -> list[str]:
    """A markdown table; align: one 'l' or 'r' per column."""
    rule = ["---" if a == "l" else "---:" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def num(x, digits: int = 1) -> str:
    """x with thousands separators and `digits` decimals; '–' for a missing value."""
    return "–" if x is None else f"{dec(x):,.{digits}f}"


def us(x) -> str:
    """Microseconds as BENCHMARKS writes them: three significant figures, whole numbers from 100 up."""
    return "–" if x is None else f"{dec(x):,.0f}" if x >= 100 else f"{dec(x):.1f}"


def ms(x) -> str:
    return "–" if x is None else f"{dec(x):.2f}" if x < 10 else f"{dec(x):,.1f}"


def qps(x) -> str:
    return f"{dec(x):,.0f}" if x >= 100 else f"{dec(x):.1f}"


def kilo(n: int) -> str:
    return f"{n // 1024}k"


def stamp_line(stem: str, data: dict) -> str:
    st = data.get("stamp") or {}
    v = st.get("versions") or {}
    where = st.get("gpu") or (f"{st['cores']}-core CPU" if st.get("cores") else "CPU") + \
        (f" ({st['cpu']})" if st.get("cpu") else "")
    soft = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "faiss", "grpcio") if v.get(k))
    commit = (st.get("commit") or "?")[:7] + ("+dirty" if st.get("dirty") else "")
    when = (st.get("date") or "?")[:10]
    legacy = "; stamped afterwards from git" if st.get("legacy") else ""
    return f"<sub>`bench/results/{stem}.json`: {where}{', ' + soft if soft else ''}; commit {commit}, {when}{legacy}</sub>"


def render(name: str, results_dir: Path = RESULTS_DIR) -> str:
    """The table NAME = <results file stem>[:view], drawn by the function registered for the file's bench."""
    stem, _, view = name.partition(":")
    data = json.loads((results_dir / f"{stem}.json").read_text())
    key = data["bench"] + (f":{view}" if view else "")
    if key not in TABLES:
        raise KeyError(f"BENCHMARKS.md names table {name!r}: bench/report.py draws no table {key!r} "
                       f"(known: {', '.join(sorted(TABLES))})")
    return "\n".join([*TABLES[key](data), "", stamp_line(stem, data)])


def update(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """text with every table block rendered anew from the results."""
    return BLOCK.sub(lambda m: f"<!-- table:{m[1]} -->\n{render(m[1], results_dir)}\n<!-- /table -->", text)


def unplaced(text: str, results_dir: Path = RESULTS_DIR) -> list[str]:
    """Results files that no block of text renders."""
    placed = {m[1].split(":")[0] for m in BLOCK.finditer(text)}
    return sorted(p.stem for p in results_dir.glob("*.json") if p.stem not in placed)


@table("ngram_ab")
def ngram_ab_table(d):
    rows = [[k, us(v["ours_us"]), us(v["baseline_us"]), f"{dec(v['ratio']):.3f}"] for k, v in d["per_call"].items()]
    return [f"Engine of this commit against {d['baseline']}, {d['queries']:,} queries, median of {d['rounds']} "
            f"rounds (fresh processes, alternating), index of {d['index_tokens']:,} tokens:", "",
            *md(["query", "ours (µs CPU)", "baseline (µs CPU)", "ours / baseline (median of rounds)"], rows, "lrrr")]


@table("decoder")
def decoder_table(d):
    out = []
    if "batch1" in d:
        rows = [[name, f"{dec(r['params_m'])}M {r['dtype'].replace('torch.', '')}", num(r["hf_tokens_per_s"]),
                 num(r["ours_tokens_per_s"]), f"{dec(r['speedup']):.2f}×", ms(r["ttft_512_hf_ms"]),
                 ms(r["ttft_512_ours_ms"]), f"{dec(r['ttft_ratio']):.2f}", f"{r['logits_rel_err_512']:.1e}",
                 f"{r['greedy_tokens_agree']}/{r['new_tokens']}"] for name, r in d["batch1"].items()]
        out += md(["model", "weights", "HF generate (tok/s)", "ours (tok/s)", "speed-up", "TTFT 512 HF (ms)",
                   "TTFT ours (ms)", "TTFT ours/HF", "logits rel. err", "greedy agree"], rows, "llrrrrrrrr")
        variants = [(name, r) for name, r in d["batch1"].items() if "ours_no_matvec_tokens_per_s" in r]
        if variants:
            rows = [[name, num(r["ours_unfused_tokens_per_s"]), num(r["ours_no_matvec_tokens_per_s"]),
                     num(r["ours_tokens_per_s"]), f"{dec(r['ours_no_matvec_tokens_per_s'] / r['hf_tokens_per_s']):.2f}×",
                     ms(r["ttft_512_ours_unfused_ms"]), ms(r["ttft_512_ours_no_matvec_ms"]), ms(r["ttft_512_ours_ms"])]
                    for name, r in variants]
            out += ["", "The same run with parts switched off (`set_backend(fused=..., matvec_rows=...)`); \"ours\" above "
                    "is the last column:", "",
                    *md(["model", "unfused (tok/s)", "fused (tok/s)", "fused + norm_matvec (tok/s)", "fused / HF",
                         "TTFT unfused (ms)", "TTFT fused (ms)", "TTFT fused + norm_matvec (ms)"], rows, "lrrrrrrr")]
    if "infgram" in d:
        r = d["infgram"]
        out += ["", f"∞-gram interpolation at batch 1 (SmolLM2, ngram_lambda 0.5, index of {r['index_tokens']:,} "
                f"tokens): {dec(r['per_token_ms_lm']):.2f} ms per token → {dec(r['per_token_ms_lm_infgram']):.2f} ms "
                f"({dec(100 * r['overhead']):+.1f}%)."]
    return out


@table("decoder_serve")
def decoder_serve_table(d):
    b, s = d["batch1"], d["serve"]
    rows = [["batch 1 (one stream)", num(b["tokens_per_s"]), "–", f"{dec(b['itl_p50_ms']):.2f}", "–",
             ms(b["ttft_ms"]), "–", str(b["failed"])],
            [f"{s['streams']} streams × {s['new_tokens']} tokens", num(s["tokens_per_s"]),
             f"{dec(s['ratio_to_batch1']):.2f}× (target ≥ {s['target_ratio']:g}×)", f"{dec(s['itl_p50_ms']):.2f}",
             f"{dec(s['itl_p99_ms']):.2f}", ms(s["ttft_p50_ms"]), ms(s["ttft_p99_ms"]), str(s["failed"])]]
    return [f"Model: {d['model']}, served by `retrogram serve decoder` ({d['server']['info']['device']}, "
            f"{d['server']['info']['dtype']}), clients over gRPC on loopback:", "",
            *md(["load", "tokens/s", "vs batch 1", "inter-token p50 (ms)", "p99 (ms)", "TTFT p50 (ms)", "TTFT p99 (ms)",
                 "failed calls"], rows, "lrrrrrrr")]


# ------------------------------------------------------------------------------------------------ index, n-gram
@table("tokenize")
def tokenize_table(d):
    base, ours = d["baseline_single_process_tokenizer_batch"], d["ours_tokenize_stage"]
    big_key = next(k for k in d if k.startswith("ours_corpus_x"))
    big = d[big_key]
    rows = [["baseline `tokenizer(batch)` loop", num(base["seconds"]), num(base["mb_per_s"], 2), "–"],
            ["ours, corpus ×1", num(ours["seconds"]), num(ours["mb_per_s"], 2), f"{dec(ours['peak_rss_mib']):.0f} MiB"],
            [f"ours, corpus ×{big_key.removeprefix('ours_corpus_x')} ({big['tokens']:,} tokens)", num(big["seconds"]),
             num(big["mb_per_s"], 2), f"{dec(big['peak_rss_mib']):.0f} MiB"]]
    return md(["", "seconds (median)", "MB/s", "peak RSS (process tree)"], rows, "lrrr")


NGRAM_LABELS = {"ntd": "ntd (max_support 1000)", "search_docs": "search_docs (maxnum 1)",
                "count_cnf": "count_cnf (2 clauses)"}


def target(ratio) -> str:
    return "–" if ratio is None else f"≤ 1/{round(1 / ratio)}"


@table("ngram")
def ngram_table(d):
    rows = []
    for name, r in d["queries"].items():
        met = " met" if r.get("met") else " not met"
        if name == "count_many":
            calls = r["calls_us_per_query"]
            rows.append([f"count_many ({r['queries']:,} queries a call)",
                         f"{dec(r['ours_cpu_us_per_query']):.2f} per query (median of {len(calls)} calls: "
                         f"{dec(min(calls)):.2f}–{dec(max(calls)):.2f})", "–", "–", f"≤ {r['target_us']:g} µs" + met])
        elif name == "score_sequence":
            rows.append([f"score_sequence, {r['tokens'] // 1000}k held-out tokens", f"{dec(r['ours_cpu_us_per_token']):.1f} per token",
                         f"{dec(r['infinigram_infgram_prob_cpu_us_per_token']):.0f} per position (infgram_prob)",
                         f"{dec(r['speedup']):.0f}× faster", f"≥ {r['target_speedup']}×" + met])
        else:
            rows.append([NGRAM_LABELS.get(name, name), us(r["ours_cpu_us"]), us(r["infinigram_cpu_us"]),
                         f"{dec(r['ratio_cpu']):.2g} ({dec(r['ratio_wall']):.2g})",
                         target(r.get("target_ratio")) + (met if "met" in r else "")])
    return md(["query", "ours (µs)", "infini-gram (µs)", "ratio CPU (wall)", "target"], rows, "lrrrl")


@table("ngram_scale")
def ngram_scale_table(d):
    big, sh, q = d["big"], d["sharded"], d["queries"]
    builds = [[label, f"{x['mem_gib']:g}", f"{x['shards']} ({x['processes_at_once']} at once)", f"{dec(x['ngram_seconds']):.0f}",
               f"{x['peak_rss_mb_per_process']:,}", f"{dec(x['engine_open_seconds']):.2f}"]
              for label, x in (("one shard", big), ("sharded", sh))]
    queries = [["count", us(q["count_us_one_shard"]), us(q["count_us_sharded"]), us(q["infinigram_count_us_one_shard"])],
               ["infgram_prob", us(q["infgram_prob_us_one_shard"]), us(q["infgram_prob_us_sharded"]),
                us(q["infinigram_infgram_prob_us_one_shard"])],
               ["count_many, per query", f"{dec(q['count_many_us_per_query_one_shard']):.1f}",
                f"{dec(q['count_many_us_per_query_sharded']):.1f}", "–"]]
    return (md([f"build of {big['tokens']:,} tokens", "--mem GiB", "shards", "ngram stage s", "peak RSS MB per process",
                "engine open s"], builds, "lrrrrr") + [""] +
            md(["CPU-time median (µs)", "one shard", f"{sh['shards']} shards", "infini-gram, one shard"], queries, "lrrr"))


# ------------------------------------------------------------------------------------------------ kernels
@table("kernels")
def prefill_table(d):
    rows = [[kilo(r["T"]), ms(r["sdpa_ms"]), f"{dec(r['sdpa_tflops']):.0f}", ms(r["flash_ms"]), f"{dec(r['flash_tflops']):.0f}",
             f"{dec(r['flash_vs_sdpa']):.2f}"] for r in d["prefill"]]
    return md(["T", "SDPA ms", "SDPA TFLOP/s", "flash_prefill ms", "TFLOP/s", "x SDPA"], rows, "rrrrrr")


@table("kernels:random")
def sparse_random_table(d):
    rows = [[kilo(r["T"]), key.split("_")[0] + " " + r["label"], ms(r["sdpa_ms"]),
             f"{ms(r['total_ms'])} ({dec(r['speedup_vs_sdpa']):.1f}x)", ms(r["attn_ms"]), f"{dec(r['density']):.3f}"]
            for key in ("hip_prefill", "vs_prefill") for r in d[key]]
    rows += [[kilo(r["T"]), f"CCA, batch {r['B']}, {r['neighbour_tokens']} neighbour tokens per {r['chunk']}-token chunk",
              ms(r["sdpa_ms"]), f"{ms(r['cca_ms'])} ({dec(r['sdpa_ms'] / r['cca_ms']):.2f}x)", "–", "–"] for r in d["cca"]]
    return md(["T", "selection (random data, 32 x 128)", "SDPA ms", "total ms (x SDPA)", "attention ms", "density"],
              rows, "rlrrrr")


@table("kernels_checks")
def checks_table(d):
    rows = []
    for c in d["checks"]:
        case = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("kernel", "rel_err", "tol", "ok"))
        rows.append([c["kernel"], case, f"{dec(c['rel_err']):.2e}", f"{c['tol']:g}", "ok" if c["ok"] else "FAIL"])
    return md(["kernel (bf16, GPU)", "case", "error vs float64", "tolerance", ""], rows, "llrrl") + \
        ["", f"{sum(c['ok'] for c in d['checks'])}/{len(d['checks'])} ok."]


def pct_of(tbps, copy) -> str:
    return f"{dec(tbps):.2f} ({dec(100 * tbps / copy):.0f}%)"


@table("kernels_decode")
def decode_table(d):
    copy = d["ceilings"]["copy_TBps"]
    rows = [[r["B"], kilo(r["S"]), r["HKV"], num(r.get("sdpa_graph_TBps"), 2), pct_of(r["flash_graph_TBps"], copy),
             pct_of(r["paged_graph_TBps"], copy)] for r in d["decode"]]
    return md(["batch", "KV len", "KV heads", "SDPA TB/s", "flash_decode TB/s", "paged (256-token pages) TB/s"], rows,
              "rrrrrr")


@table("kernels_decode:hip")
def hip_decode_table(d):
    by = {(r["B"], r["HKV"], r["S"]): r for r in d["decode"]}
    lens = sorted({r["S"] for r in d["decode"]})
    rows = []
    for hkv, B in sorted({(r["HKV"], r["B"]) for r in d["decode"]}, key=lambda x: (-x[0], x[1])):
        label = ("MHA" if hkv == by[(B, hkv, lens[0])]["H"] else f"GQA {by[(B, hkv, lens[0])]['H']}/{hkv}") + f" batch {B}"
        rows.append([label] + [f"{dec(by[(B, hkv, S)][key]):.1f}x" for key in ("hip_speedup_vs_dense_graph", "hip_speedup_vs_dense")
                               for S in lens])
    return md(["config"] + [f"{m} {kilo(S)}" for m in ("graph", "eager") for S in lens], rows, "l" + "r" * 2 * len(lens))


def selection_rows(summary: dict) -> list[list]:
    rows = []
    for Ts, s in summary.items():
        keys = [s[k] for k in s if k.endswith("_at_bound")] + ["vs_last_q"]
        for key in keys:
            x = s[key]
            rows.append([kilo(int(Ts)), key, f"{dec(x['recall_mean']):.4f}", f"{dec(x['recall_min_layer']):.3f}",
                         f"{dec(x['density_mean']):.3f}", f"{dec(x['density_max_layer']):.3f}"])
    return rows


VARIANTS = {"hip": "HiP, 64-row blocks", "vs": "vertical-slash, 64-row blocks", "hip128": "HiP, 128-row blocks",
            "hip128r2": "HiP, 128-row blocks, 2 sampled rows", "hip128k128": "HiP, 128 x 128 blocks"}


def projected_rows(projected: list) -> list[list]:
    rows = []
    for r in projected:
        for name, label in VARIANTS.items():
            if f"{name}_density_mean" not in r:
                continue
            sel, at = r[f"{name}_selection"], r[f"{name}_density_mean"]
            est = sel.get("estimate_ms", r["estimate_ms"])
            select = sel.get("select_ms", r["topp_ms"] if name == "hip" else r["vs_select_ms"])
            for lists, x in (("random", at), ("SmolLM2's own", r.get(f"{name}_real_lists"))):
                if x is None:
                    continue
                pointer = x.get("attn_ms_pointer_loads")
                attn = ms(x["attn_ms"]) + (f" ({ms(pointer)})" if pointer else "")
                rows.append([kilo(r["T"]), f"{label}, {lists} lists ({sel['key']})", f"{dec(x['density']):.3f}", ms(est),
                             ms(select), attn, ms(x["total_ms"]), f"{dec(x['x_sdpa']):.2f}x", f"{dec(x['attn_vs_flash_at_density']):.2f}"])
    return rows


PROJECTED_HEADER = ["T", "variant (selection at the recall bound)", "density", "estimate ms", "select ms",
                    "attention ms (pointer loads)", "total ms", "x SDPA", "attn / (density x flash)"]


def projected_baselines(projected: list) -> str:
    return "; ".join(f"{kilo(r['T'])}: SDPA {ms(r['sdpa_ms'])} ms, flash_prefill {ms(r['flash_prefill_ms'])} ms"
                     for r in projected)


@table("kernels_long")
def long_table(d):
    sel = md(["T", "selection on SmolLM2's attention", "recall", "worst layer", "density", "worst layer's density"],
             selection_rows(d["smollm2_summary"]), "rlrrrr")
    return sel + ["", f"32 heads x 128 at those densities ({projected_baselines(d['projected_32x128'])}):", ""] + \
        md(PROJECTED_HEADER, projected_rows(d["projected_32x128"]), "rlrrrrrrr")


@table("kernels_sparse")
def sparse_table(d):
    checks = [[c["name"], f"{dec(c['value']):.3g}", "ok" if c["ok"] else "FAIL"] for c in d["checks"]]
    return md(["selection kernel check (GPU, against the reference)", "error or rows differing", ""], checks, "lrl") + \
        ["", f"32 heads x 128 at the recorded densities ({projected_baselines(d['projected_32x128'])}):", ""] + \
        md(PROJECTED_HEADER, projected_rows(d["projected_32x128"]), "rlrrrrrrr")


@table("kernels_mass")
def mass_table(d):
    rows = []
    for r in d["mass"]:
        caps = ", ".join(f"{c}: {ms(v['ms'])} ({dec(v['density']):.2f}, {dec(v['speedup_vs_sdpa']):.1f}x)" for c, v in r["e2e"].items())
        dens = ", ".join(f"{dec(v['density']):.2f}: {ms(v['ms'])}" for v in r["attn_at_density"].values())
        rows.append([kilo(r["T"]), ms(r["sdpa_ms"]), ms(r["flash_ms"]),
                     f"{ms(r['estimate_rows2_ms'])} / {ms(r['estimate_rows4_ms'])}", dens, caps])
    return md(["T", "SDPA ms", "flash ms", "estimate ms (2 / 4 rows)", "attention ms at density",
               "HiP mass end to end, block cap: ms (density, x SDPA)"], rows, "rrrrll")


@table("kernels_smollm2")
def smollm2_table(d):
    impls = [i for i in d["greedy"][0]["identical"] if i != "sdpa"]
    greedy = [[g["prompt"]] + ["yes" if g["identical"][i] else "no" for i in impls] for g in d["greedy"]]
    out = md(["greedy tokens identical to SDPA"] + [f"`{i}`" for i in impls], greedy, "l" + "l" * len(impls))
    longs = [r for r in d["long"] if "prefill_ms" in r]
    if longs:
        names = list(longs[0]["prefill_ms"])
        out += [""] + md(["T (RoPE x)"] + [f"`{i}` prefill ms" for i in names],
                         [[f"{kilo(r['T'])} (x{r['rope']['factor']:g})"] + [ms(r["prefill_ms"][i]) for i in names]
                          for r in longs], "r" * (1 + len(names)))
    return out


@table("kernels_recall")
def recall_table(d):
    rows = []
    for name, r in d.items():
        if name in ("bench", "stamp", "stamps"):
            continue
        if "configs" in r:   # as bench.kernels.recall writes it
            cfgs = {k: (v["recall_mean"], v["recall_min_layer"], v["density"]) for k, v in r["configs"].items()}
            oracle = r["oracle95_density_mean"]
        else:                # the first run's layout: (rows, top_p) -> per layer [recall, kept fraction]
            cfgs = {k: (sum(x[0] for x in v) / len(v), min(x[0] for x in v), sum(x[1] for x in v) / len(v))
                    for k, v in r["cfg"].items()}
            oracle = sum(r["oracle95"]) / len(r["oracle95"])
        rows += [[name, f"{kilo(r['T'])}", k, f"{dec(a):.3f}", f"{dec(b):.3f}", f"{dec(c):.3f}", f"{dec(oracle):.3f}"]
                 for k, (a, b, c) in cfgs.items()]
    return md(["capture", "T", "sampled rows, top-p", "recall", "worst layer", "density", "oracle density (0.95)"],
              rows, "lrlrrrr")


def variant_label(section: str, v) -> str:
    """Variants are labels now; the first runs recorded the launch parameters as a list."""
    if isinstance(v, str):
        return v
    if section == "est":
        return "bm={} kpt={} w={} s={}".format(*v)
    if v[0] == "pair":
        return "pair ws={} w={} s={}".format(*v[1:])
    return "tma={} w={} s={}".format(*v)


@table("kernels_variants")
def variants_table(d):
    out = []
    if "read" in d:
        rows = [[r["name"], f"{dec(r['us']):.1f}", f"{dec(r['TBps']):.2f}", f"{dec(100 * r['pct_copy_4.24']):.1f}%"] for r in d["read"]["rows"]]
        out += md(["decode, GQA 32/8, batch 1, 32k (134 MB of K/V), CUDA graph", "µs", "TB/s", "% of 4.24 TB/s copy"],
                  rows, "lrrr")
    for sec, label in (("est", "estimator (sampled_block_mass) at 128k"), ("core", "block-sparse core at 128k")):
        if sec in d:
            rows = [[variant_label(sec, r["variant"]) + (f" ({r['cfg']})" if "cfg" in r else ""), ms(r["ms"]),
                     f"{dec(r['x_current']):.2f}" if "x_current" in r else "1.00"] for r in d[sec]["rows"]]
            out += [""] + md([label, "ms", "x current"], rows, "lrr")
    if "flash" in d:
        rows = [[kilo(r["T"]), f"{dec(r['sdpa_TFLOPs']):.0f}", f"{dec(r['tma0_TFLOPs']):.0f}", f"{dec(r['tma1_TFLOPs']):.0f}",
                 f"{dec(r['tma0_ms'] / r['tma1_ms']):.3f}"] for r in d["flash"]["rows"]]
        out += [""] + md(["flash_prefill T", "SDPA TFLOP/s", "pointer loads TFLOP/s", "TMA TFLOP/s", "TMA speedup"], rows,
                         "rrrrr")
    checks = [c for sec in ("read", "est", "core", "flash") if sec in d for c in d[sec]["checks"]]
    out += ["", f"Checks against the current kernels: {sum(c['ok'] for c in checks)}/{len(checks)} ok."]
    return out


# ------------------------------------------------------------------------------------------------ retrieval
@table("retrieval_gpu")
def topk_table(d):
    labels = {"gaussian": "Gaussian", "clustered": "clustered (4,096-component mixture)"}
    rows = [[labels.get(r["data"], r["data"]), f"{dec(r['torch_topk_qps']):,.0f} q/s ({ms(r['torch_ms'])} ms)",
             f"{dec(r['topk_scan_qps']):,.0f} q/s ({ms(r['kernel_ms'])} ms)", f"{dec(r['speedup']):.2f}×"] for r in d["timing"]]
    ok = sum(c["ok"] for c in d["correctness"])
    return md(["data", "`torch.topk(q @ db.T, 10)`", "`topk_scan` (Triton)", "speedup"], rows, "lrrr") + \
        ["", f"Correctness on the GPU: {ok}/{len(d['correctness'])} shapes within 1e-3 of the float32 reference."]


def sweep_rows(section: str, s: dict, threads=None) -> list[list]:
    rows = []
    for sw in s["sweeps"]:
        for r in sw["curve"]:
            param = "nprobe" if "nprobe" in r else "ef_search"
            label = sw["factory"] + (" + re-rank" if sw.get("rerank", 1) > 1 else "")
            if threads:
                qps = [f"{dec(r[f'qps_{t}t']):,.0f} ({dec(r[f'speedup_vs_exact_{t}t']):.1f}×)" for t in threads]
            elif "qps" in r:
                qps = [f"{dec(r['qps']):,.0f} ({dec(r['speedup_vs_exact']):.1f}×)"]
            else:
                t = next(k for k in r if k.startswith("qps_")).removeprefix("qps_")
                qps = [f"{dec(r[f'qps_{t}']):,.0f} ({dec(r[f'speedup_vs_exact_{t}']):.1f}×)"]
            rows.append([section, label, f"{param} {r[param]}", f"{dec(r['recall_at_10']):.3f}", *qps])
    return rows


@table("retrieval")
def retrieval_cpu_table(d):
    rows = []
    for section in ("real", "synthetic", "synthetic_5m", "synthetic_jitter"):
        if section in d:
            s = d[section]
            rows.append([section, f"exact (faiss Flat), {s['n']:,} vectors", "", "1", f"{qps(s['exact_qps'])} (1×)"])
            rows += sweep_rows(section, s)
    out = md(["set", "index", "setting", "recall@10", "q/s (× exact)"], rows, "lllrr")
    if "embed" in d:
        e = d["embed"]
        out += ["", f"Embedding {e['chunks']:,} real chunks on {e['threads']} thread(s): sentence-transformers "
                f"`encode(list)` {dec(e['st_encode_chunks_per_s']):.1f} chunks/s; " +
                "; ".join(f"{v['variant']}: {dec(v['chunks_per_s']):.1f} chunks/s ({dec(v['speedup']):.2f}×, min cosine "
                          f"{dec(v['min_cosine_vs_st']):.5f})" for v in e["variants"]) + "."]
    return out


@table("retrieval_full")
def retrieval_full_table(d):
    real = d["real"]
    threads = sorted(int(t.removesuffix("t")) for t in real["exact_qps"])
    rows = [["real", f"exact (faiss Flat), {real['n']:,} vectors", "", "1",
             *[f"{qps(real['exact_qps'][f'{t}t'])} (1×)" for t in threads]]]
    rows += sweep_rows("real", real, threads)
    out = md(["set", "index", "setting", "recall@10", *[f"{t} thread{'s' * (t > 1)} q/s (× exact)" for t in threads]],
             rows, "lllr" + "r" * len(threads))
    e = d["embed"]
    return out + ["", f"Embedding all {e['chunks']:,} chunks on the GPU ({e['device']}): {dec(e['chunks_per_s']):,.0f} chunks/s "
                  f"({dec(e['seconds']):.1f} s, tokenizing {dec(e['tokenize_seconds']):.1f} s)."]


@table("retrieval_gpu_ivf")
def gpu_ivf_table(d):
    rows = [[r["nprobe"], f"{dec(r['recall_at_10']):.3f}", f"{dec(r['qps']):,.0f}", f"{dec(r['peak_gpu_bytes'] / 1e9):.1f}"]
            for r in d["curve"]]
    x = d["exact_streaming"]
    rows.append([f"{x['nprobe']} (every list)", f"{dec(x['recall_at_10']):.3f}", f"{dec(x['qps']):,.0f}", "–"])
    return md([f"nprobe (IVF{d['nlist']}, {d['n']:,} x {d['dim']} fp16 in host memory)", "recall@10", "q/s",
               "peak GPU GB"], rows, "lrrr")


# ------------------------------------------------------------------------------------------------ services
@table("services")
def services_table(d):
    e, lat = d["engine"], d.get("latency", {})
    rows = [["in-process engine, one thread: `count`", f"{dec(e['count_per_s']):,.0f}/s (p50 {dec(e['count_p50_us']):.1f} µs)", ""],
            ["in-process engine: `count_many` / `count_packed`", f"{dec(e['count_many_per_s']):,.0f} / {dec(e['count_packed_per_s']):,.0f} "
             "counts/s", ""]]
    for key, label in (("count_many", "gRPC `CountMany`"), ("count", "gRPC unary `Count`"),
                       ("count_session", "`Count` over a Session stream per client"), ("retrieve", "`Retrieve`")):
        if key in d:
            r = d[key]
            what = f" ({r['batch']:,} packed queries a call)" if key == "count_many" else ""
            rate = (f"{dec(r['counts_per_s']):,.0f} counts/s = {dec(r['vs_engine_single_core']):.2f}× the single-core rate"
                    if key == "count_many" else f"{dec(r['calls_per_s']):,.0f} calls/s")
            rows.append([f"{label}{what}, {r['clients']} clients, {dec(r['duration_s']):.0f} s",
                         f"{rate}, p50 {ms(r['p50_us'] / 1e3)} ms, p99 {ms(r['p99_us'] / 1e3)} ms",
                         f"{r['failed']} failed of {r['calls']:,}"])
    if lat:
        rows.append(["`NgramClient.count` round trip, one call at a time (Session stream)",
                     f"p50 {dec(lat['rtt_p50_us']):.0f} µs, p99 {dec(lat['rtt_p99_us']):.0f} µs",
                     f"overhead {dec(lat['overhead_p50_us']):.0f} µs (target ≤ {lat['target_overhead_p50_us']})"])
        rows.append(["same, `sessions=False` / bare channel / grpcio health Check (p50)",
                     f"{dec(lat['unary_rtt_p50_us']):.0f} / {dec(lat['bare_channel_count_rtt_p50_us']):.0f} / "
                     f"{dec(lat['health_check_rtt_p50_us']):.0f} µs", ""])
    for name, v in d.get("latency_variants", {}).items():
        rows.append([f"I/O variant {name}: session / unary p50", f"{dec(v['rtt_p50_us']):.0f} / {dec(v['unary_rtt_p50_us']):.0f} µs",
                     f"{len(v['rounds'])} rounds"])
    return md(["measure", "result", ""], rows, "lll")


def main() -> int:
    ap = parser(__doc__, __spec__)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when BENCHMARKS.md is out of date")
    ap.add_argument("--file", type=Path, default=BENCHMARKS)
    args = ap.parse_args()
    text = args.file.read_text()
    new = update(text)
    missing = unplaced(new)
    if missing:
        print(f"results files with no table block in {args.file.name}: {', '.join(missing)}", file=sys.stderr)
    if args.check:
        if new != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       str(args.file), "rendered from bench/results"))
            return 1
        return 1 if missing else 0
    if new != text:
        args.file.write_text(new)
        print(f"rewrote the tables of {args.file}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
