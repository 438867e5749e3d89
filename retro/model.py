"""The decoder's forward over a llama-family model (gpt-fast style), on a packed batch over a paged KV cache.

    logits = model(tokens, positions, batch, cache, logits_at)

tokens [N] are the new tokens of several sequences concatenated (prefill chunks and single decode tokens
mixed); each attends to its own cached prefix plus its own new tokens (AttentionBatch says which is which).
Only the rows listed in logits_at go through the LM head.

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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32, as transformers' LlamaRMSNorm, then the weight in the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # q, k, v projections fused: one matmul
        self.wqkv = nn.Linear(config.dim, config.q_size + 2 * config.kv_size, bias=config.attention_bias)
        self.wo = nn.Linear(config.q_size, config.dim, bias=config.attention_out_bias)
        self.split = (config.q_size, config.kv_size, config.kv_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch,
                cache: KVCache, backend: str, opts: TritonOptions | None) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.wqkv(x).split(self.split, dim=-1)  # [N, HQ*D], [N, HKV*D], [N, HKV*D]
        q = apply_rope(q.view(N, self.n_heads, self.head_dim), cos, sin)      # [N, HQ, D]
        k = apply_rope(k.view(N, self.n_kv_heads, self.head_dim), cos, sin)   # [N, HKV, D]
        v = v.view(N, self.n_kv_heads, self.head_dim)
        cache.write(self.layer, batch.slot_mapping, k, v)
        o = attend(q, self.layer, batch, cache, backend, None, opts)          # [N, HQ, D]
        return self.wo(o.reshape(N, -1).to(x.dtype))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), w1 (gate) and w3 (up) fused."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.hidden = config.intermediate_size
        self.w13 = nn.Linear(config.dim, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)  # [N, I] each
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

    def forward(self, x, cos, sin, batch, cache, backend, opts, neighbours=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, batch, cache, backend, opts)
        if self.cross_attn is not None:
            h = self.cross_attn(h, batch, neighbours)
        return h + self.feed_forward(self.ffn_norm(h))


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

    def set_backend(self, backend: str = "auto", options: TritonOptions | None = None) -> "Transformer":
        """"auto": triton on CUDA, sdpa elsewhere."""
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "sdpa"
        if backend not in ("sdpa", "triton"):
            raise ValueError(f"attention backend {backend!r}: expected 'auto', 'sdpa' or 'triton'")
        self.attn_backend = backend
        self.attn_options = options
        return self

    def new_cache(self, num_pages: int, page_size: int = 64) -> KVCache:
        """An empty paged cache for this model (its dtype and device)."""
        return KVCache(self.config, num_pages, page_size, self.dtype, self.device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, cache: KVCache,
                logits_at: torch.Tensor | None = None, neighbours=None) -> torch.Tensor:
        """tokens, positions [N] -> logits [M, V] float32 of the rows logits_at [M] (all N when None)."""
        x = self.tok_embeddings(tokens)                       # [N, dim]
        cos, sin = self.rope(positions)                       # [N, D] float32
        for block in self.layers:
            x = block(x, cos, sin, batch, cache, self.attn_backend, self.attn_options, neighbours)
        if logits_at is not None:
            x = x[logits_at]                                  # [M, dim]
        return self.output(self.norm(x)).float()              # [M, V]
