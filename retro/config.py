"""The decoder's model configuration: one dataclass for the llama family (llama, qwen2, mistral), read from a
Hugging Face config.json and written back as one (RETRO-fitted checkpoints are saved HF-style)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..index.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# "dynamic" (NTK) is not here: transformers recomputes its frequencies from the longest position of each
# forward call, so its keys depend on how the sequence was cut into calls; "longrope" needs per-dimension
# factor lists switched at a length: neither is implemented.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UnsupportedModelError(UserError):
    """A checkpoint whose architecture or options this decoder does not implement."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF `rope_parameters` / `rope_scaling`), validated. `type` "default" = none."""

    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None   # llama3, yarn
    low_freq_factor: float = 1.0                         # llama3
    high_freq_factor: float = 4.0                        # llama3
    beta_fast: float = 32.0                              # yarn
    beta_slow: float = 1.0                               # yarn
    attention_factor: float | None = None                # yarn (None: 0.1 ln(factor) + 1, or from mscale)
    mscale: float | None = None                          # yarn
    mscale_all_dim: float | None = None                  # yarn
    truncate: bool = True                                # yarn

    @classmethod
    def from_hf(cls, d: dict | None, max_position_embeddings: int, where: str = "rope_scaling") -> "RopeScaling":
        if not d:
            return cls()
        kind = d.get("rope_type", d.get("type", "default")) or "default"
        if kind not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"{where}: rope type {kind!r} is not supported; supported: "
                                        f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        if d.get("partial_rotary_factor", 1.0) not in (None, 1.0):
            raise UnsupportedModelError(f"{where}: partial_rotary_factor {d['partial_rotary_factor']} is not "
                                        "supported (RoPE over the whole head only)")
        if kind == "default":
            return cls()
        factor = d.get("factor")
        if factor is None and kind == "yarn" and d.get("original_max_position_embeddings"):
            # transformers: the ratio of the context lengths
            factor = max_position_embeddings / d["original_max_position_embeddings"]
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise UnsupportedModelError(f"{where}: rope type {kind!r} needs a positive 'factor', got {factor!r}")
        omax = d.get("original_max_position_embeddings")
        if kind in ("llama3", "yarn"):
            omax = int(omax or max_position_embeddings)
        if kind == "llama3" and not d.get("high_freq_factor", 4.0) > d.get("low_freq_factor", 1.0):
            raise UnsupportedModelError(f"{where}: llama3 needs high_freq_factor > low_freq_factor")
        opt = {k: d[k] for k in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                                 "attention_factor", "mscale", "mscale_all_dim", "truncate") if d.get(k) is not None}
        return cls(type=kind, factor=float(factor), original_max_position_embeddings=omax, **opt)

    def to_hf(self, rope_theta: float) -> dict:
        d: dict = {"rope_type": self.type, "rope_theta": rope_theta}
        if self.type == "default":
            return d
        d["factor"] = self.factor
        if self.type == "llama3":
            d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                     original_max_position_embeddings=self.original_max_position_embeddings)
        elif self.type == "yarn":
            d.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate,
                     original_max_position_embeddings=self.original_max_position_embeddings)
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, k) is not None:
                    d[k] = getattr(self, k)
        return d


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False       # q/k/v projections
    attention_out_bias: bool = False   # o projection (llama's attention_bias covers both; qwen2 has q/k/v only)
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    dtype: torch.dtype = torch.float32  # the checkpoint's

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
                     "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                            f"({self.n_kv_heads})")
        if self.head_dim % 2:
            raise UserError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """SmolLM2's architecture (llama, GQA 3:1 here 2:1, tied embeddings, SwiGLU) at test size."""
        base = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                    intermediate_size=128, max_position_embeddings=512, rope_theta=100000.0,
                    bos_token_id=1, eos_token_ids=(2,))
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "ModelConfig":
        """From a Hugging Face config dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        if not isinstance(cfg, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            arch = cfg.get("architectures")
            raise UnsupportedModelError(
                f"{where}: model_type {mt!r}{f' (architectures {arch})' if arch else ''} is not supported; the "
                f"decoder runs llama-family models: model_type one of {', '.join(SUPPORTED_MODEL_TYPES)}")

        def req(key):
            if key not in cfg:
                raise UserError(f"{where}: missing {key!r} (a {mt} config needs it)")
            return cfg[key]

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{where}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
        dim, n_heads = req("hidden_size"), req("num_attention_heads")
        n_kv = cfg.get("num_key_value_heads") or n_heads
        head_dim = cfg.get("head_dim") or dim // n_heads
        max_pos = req("max_position_embeddings")
        _check_sliding_window(cfg, mt, max_pos, where)
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope and any(isinstance(v, dict) for v in rope.values()):
            raise UnsupportedModelError(f"{where}: per-layer-type RoPE parameters are not supported")
        rope_theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
        if cfg.get("partial_rotary_factor", 1.0) not in (None, 1.0):
            raise UnsupportedModelError(f"{where}: partial_rotary_factor {cfg['partial_rotary_factor']} is not "
                                        "supported (RoPE over the whole head only)")
        if "original_max_position_embeddings" in cfg and rope:
            rope = {**rope, "original_max_position_embeddings": cfg["original_max_position_embeddings"]}
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        if mt == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=mt, vocab_size=req("vocab_size"), dim=dim, n_layers=req("num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=n_kv, head_dim=head_dim, intermediate_size=req("intermediate_size"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
            rope_scaling=RopeScaling.from_hf(rope, max_pos, where=f"{where} rope_parameters"),
            max_position_embeddings=max_pos, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias, attention_out_bias=o_bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
            dtype=_DTYPES.get(str(dtype).replace("torch.", ""), torch.float32))

    def to_hf(self) -> dict:
        """A config.json for transformers (the reference model in tests; HF-style checkpoints)."""
        d = {"model_type": self.model_type, "vocab_size": self.vocab_size, "hidden_size": self.dim,
             "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
             "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
             "intermediate_size": self.intermediate_size, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
             "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
             "rope_parameters": self.rope_scaling.to_hf(self.rope_theta),
             "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
             "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
             "torch_dtype": str(self.dtype).replace("torch.", "")}
        if self.model_type == "qwen2":
            d.update(use_sliding_window=False)
        elif self.model_type == "mistral":
            d.update(sliding_window=None)
        else:
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        return d


def _check_sliding_window(cfg: dict, mt: str, max_pos: int, where: str) -> None:
    """Sliding-window attention is not implemented: a window shorter than the context is refused (a window at
    least as long as every position is plain causal attention)."""
    window = cfg.get("sliding_window")
    if mt == "llama":
        window = None
    elif mt == "qwen2":
        # transformers' Qwen2: the window applies when use_sliding_window, to the layers listed as
        # sliding_attention (by default those from max_window_layers on)
        n = cfg.get("num_hidden_layers", 0)
        types = cfg.get("layer_types") or ["sliding_attention" if i >= cfg.get("max_window_layers", 28)
                                           else "full_attention" for i in range(n)]
        if not cfg.get("use_sliding_window", False) or "sliding_attention" not in types:
            window = None
    if window is not None and window < max_pos:
        raise UnsupportedModelError(
            f"{where}: sliding_window {window} is shorter than max_position_embeddings {max_pos}; sliding-window "
            "attention is not implemented (a checkpoint whose window covers the whole context loads)")
