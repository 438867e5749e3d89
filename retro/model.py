"""The decoder's forward over a llama-family model (gpt-fast style), on a packed batch over a paged KV cache.

    logits = model(tokens, positions, batch, cache, logits_at)

tokens [N] are the new tokens of several sequences concatenated (prefill chunks and single decode tokens
mixed); each attends to its own cached prefix plus its own new tokens (AttentionBatch says which is which).
Only the rows listed in logits_at go through the LM head.

The residual stream travels as a pair (x, residual): x is the last sublayer's output, not yet added, and the
next norm adds it (vLLM's layout), so on the GPU the add and the norm are one kernel. With the triton backend
the layer's elementwise work runs fused (kernels.rmsnorm, kernels.rope_cache, kernels.swiglu): a decode step
is about nine kernels a layer instead of thirty-odd; the torch code here is the reference they match. Each norm
can also fuse into the projection after it for the few rows of a decode step (kernels.norm_matvec, with SwiGLU in
the MLP's: six kernels a layer), off by default: cuBLAS's matvec was faster on the H100 (MATVEC_ROWS).

Each Block has a `cross_attn` slot (None here): RETRO's chunked cross-attention layers go there (every third
layer from the sixth) and receive the per-sequence `neighbours` passed to the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBatch, TritonOptions, attend
from .config import ModelConfig
from .kv_cache import KVCache
from .rope import Rotary, apply_rope


# Off by default: on an H100 a decode step was faster with cuBLAS's matvec after the fused norm (SmolLM2 shape
# 986 vs 904 tok/s, Llama-1B shape 728 vs 709; BENCHMARKS). set_backend(matvec_rows=4) turns it on.
MATVEC_ROWS = 0


class RMSNorm(nn.Module):
    fused = False   # kernels.rmsnorm (set by Transformer.set_backend)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim] (+ residual) -> (normed [N, dim], h = x + residual: the stream so far)."""
        if self.fused:
            from ..kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps, residual)
        h = x if residual is None else x + residual
        # in float32, as transformers' LlamaRMSNorm, then the weight in the input dtype
        hf = h.float()
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hf.to(h.dtype), h


class Attention(nn.Module):
    fused = False   # kernels.rope_cache

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # q, k, v projections fused: one matmul
        self.wqkv = nn.Linear(config.dim, config.q_size + 2 * config.kv_size, bias=config.attention_bias)
        self.wo = nn.Linear(config.q_size, config.dim, bias=config.attention_out_bias)
        self.split = (config.q_size, config.kv_size, config.kv_size)

    def forward(self, x: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch,
                cache: KVCache, backend: str, opts: TritonOptions | None,
                qkv: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, dim] normed, or qkv: its projection already made (fused with the norm)."""
        qkv = self.wqkv(x) if qkv is None else qkv                            # [N, (HQ + 2 HKV) * D]
        N = qkv.shape[0]
        if self.fused:
            from ..kernels.rope_cache import rope_cache_write

            q = rope_cache_write(qkv, cos, sin, cache.k[self.layer], cache.v[self.layer], batch.slot_mapping,
                                 self.n_heads, self.n_kv_heads)               # [N, HQ, D]
        else:
            q, k, v = qkv.split(self.split, dim=-1)  # [N, HQ*D], [N, HKV*D], [N, HKV*D]
            q = apply_rope(q.view(N, self.n_heads, self.head_dim), cos, sin)      # [N, HQ, D]
            k = apply_rope(k.view(N, self.n_kv_heads, self.head_dim), cos, sin)   # [N, HKV, D]
            v = v.view(N, self.n_kv_heads, self.head_dim)
            cache.write(self.layer, batch.slot_mapping, k, v)
        o = attend(q, self.layer, batch, cache, backend, None, opts)          # [N, HQ, D]
        return self.wo(o.reshape(N, -1).to(qkv.dtype))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), w1 (gate) and w3 (up) fused."""

    fused = False   # kernels.swiglu

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.hidden = config.intermediate_size
        self.w13 = nn.Linear(config.dim, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w13(x)                                  # [N, 2I]
        if self.fused:
            from ..kernels.swiglu import swiglu

            return self.w2(swiglu(gate_up))
        gate, up = gate_up.split(self.hidden, dim=-1)          # [N, I] each
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)
        # RETRO: a chunked cross-attention module (its own norm and residual inside) attending to the encoded
        # neighbours, called between self-attention and the MLP; None in a plain LM
        self.cross_attn: nn.Module | None = None
        # up to this many rows (a decode step) each norm runs inside the projection after it; 0: never
        self.matvec_rows = 0

    def forward(self, x, residual, cos, sin, batch, cache, backend, opts, neighbours=None):
        """The stream x + residual (residual None: x alone) in, the same pair out."""
        matvec = x.shape[0] <= self.matvec_rows
        if matvec:
            from ..kernels.norm_matvec import norm_matvec

            qkv, residual = norm_matvec(x, self.attention_norm.weight, self.attention_norm.eps,
                                        self.attention.wqkv.weight, residual)
            x = self.attention(None, cos, sin, batch, cache, backend, opts, qkv=qkv)
        else:
            h, residual = self.attention_norm(x, residual)
            x = self.attention(h, cos, sin, batch, cache, backend, opts)
        if self.cross_attn is not None:
            x, residual = self.cross_attn(x + residual, batch, neighbours), None
        if matvec:
            g, residual = norm_matvec(x, self.ffn_norm.weight, self.ffn_norm.eps, self.feed_forward.w13.weight,
                                      residual, swiglu=True)
            return self.feed_forward.w2(g), residual
        h, residual = self.ffn_norm(x, residual)
        return self.feed_forward(h), residual


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = Rotary(config)
        # "sdpa" (CPU reference) or "triton" (CUDA kernels); set_backend chooses by device
        self.attn_backend = "sdpa"
        self.attn_options: TritonOptions | None = None

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def set_backend(self, backend: str = "auto", options: TritonOptions | None = None,
                    fused: bool | None = None, matvec_rows: int | None = None) -> "Transformer":
        """"auto": triton on CUDA, sdpa elsewhere. fused: the layers' elementwise kernels (default: with triton).
        matvec_rows: steps of up to this many tokens fuse each norm into the projection after it (default
        MATVEC_ROWS when fused, else 0)."""
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "sdpa"
        if backend not in ("sdpa", "triton"):
            raise ValueError(f"attention backend {backend!r}: expected 'auto', 'sdpa' or 'triton'")
        self.attn_backend = backend
        self.attn_options = options
        fused = backend == "triton" if fused is None else bool(fused)
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, FeedForward)):
                m.fused = fused
        rows = (MATVEC_ROWS if fused else 0) if matvec_rows is None else int(matvec_rows)
        for block in self.layers:
            # plain bias-free Linear projections only (not quantized ones: retro/quant.py)
            plain = all(type(m) is nn.Linear and m.bias is None
                        for m in (block.attention.wqkv, block.feed_forward.w13))
            block.matvec_rows = rows if plain else 0
        return self

    def new_cache(self, num_pages: int, page_size: int = 64) -> KVCache:
        """An empty paged cache for this model (its dtype and device)."""
        return KVCache(self.config, num_pages, page_size, self.dtype, self.device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, cache: KVCache,
                logits_at: torch.Tensor | None = None, neighbours=None) -> torch.Tensor:
        """tokens, positions [N] -> logits [M, V] float32 of the rows logits_at [M] (all N when None)."""
        x = self.tok_embeddings(tokens)                       # [N, dim]
        cos, sin = self.rope(positions)                       # [N, D] float32
        residual = None
        for block in self.layers:
            x, residual = block(x, residual, cos, sin, batch, cache, self.attn_backend, self.attn_options,
                                neighbours)
        if logits_at is not None:
            x, residual = x[logits_at], residual[logits_at]   # [M, dim]
        h, _ = self.norm(x, residual)
        return self.output(h).float()                         # [M, V]
