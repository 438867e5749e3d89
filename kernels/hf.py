"""The kernels as transformers attention implementations (transformers' AttentionInterface).

    from retrogram.kernels.hf import register
    register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="triton_dense")

Names: "triton_dense" (flash_prefill + flash_decode), "triton_hip" (HiP sparse prefill, HiP sparse
decode with the selection refreshed every `refresh_every` steps), "triton_vs" (vertical-slash
sparse prefill, dense flash_decode). They avoid the word "flash": transformers treats any
implementation name containing it as a flash-attn package to import.

Prefill calls get query/key/value as [B, H, T, D]; the kernels take [B, T, H, D] views of them (no
copy). Padding (a 2D mask from transformers' flash mask function) is handled by unpadding into a
variable-length batch; decoding steps (few query tokens, no padding) go to the split-KV decode kernel.
"""

from __future__ import annotations

import torch

from .block_sparse_prefill import block_sparse_prefill
from .flash_decode import flash_decode
from .flash_prefill import flash_prefill
from .hip_attention import hip_attention_prefill, hip_decode, hip_decode_select
from .utils import is_interpret

NAMES = ("triton_dense", "triton_hip", "triton_vs")
# query tokens at or below which a call is treated as a decoding step
DECODE_MAX_TOKENS = 16

# prefill: adaptive "mass" selection (top-p of the sampled attention mass, see hip_attention_prefill);
# decode: hierarchical top-k ("rep") with topk blocks, refreshed every refresh_every steps
# top_p 0.96: the smallest top-p keeping the mean attention-mass recall >= 0.95 on SmolLM2's real attention at
# 32k-128k (recall lands a little under top_p). 128-row query blocks for HiP: the same recall at about the
# same density as 64-row ones, with 128-row tiles in the attention core and half the estimator's sampled
# rows: 4.9x SDPA at 128k against 4.25x (bench/results/kernels_long_h200.json, kernels_sparse_h200.json)
HIP_DEFAULTS = dict(block_size_q=128, block_size_k=64, topk=32, n_sink=1, n_local=4, n_rep=1, dense_below=8192,
                    refresh_every=8, estimator="mass", top_p=0.96, sample_rows=4, max_blocks=None)
# vertical-slash prefill: the pattern from sampled attention mass, completed to top_p (see block_sparse_prefill)
VS_DEFAULTS = dict(block_size_q=64, block_size_k=64, last_q=64, n_vertical=32, n_slash=16, n_sink=1, n_local=2,
                   dense_below=8192, estimator="mass", top_p=0.96, sample_rows=4, max_blocks=None)
_config = {"hip": dict(HIP_DEFAULTS), "vs": dict(VS_DEFAULTS)}


def _unpadded(q, k, v, mask2d, causal, scale):
    """Attention with padding: q [B, T, H, D], k/v [B, S, HKV, D], mask2d [B, S] (True = token);
    the queries are the last T positions. Packs the real tokens into a varlen batch."""
    B, T = q.shape[:2]
    mask2d = mask2d.to(torch.bool)
    qmask = mask2d[:, -T:]
    cu_q = torch.nn.functional.pad(qmask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_k = torch.nn.functional.pad(mask2d.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    o = flash_prefill(q[qmask][None], k[mask2d][None], v[mask2d][None], causal=causal, scale=scale,
                      cu_seqlens=cu_q, cu_seqlens_k=cu_k)
    out = torch.zeros(q.shape, device=q.device, dtype=q.dtype)
    out[qmask] = o[0]
    return out


def _common(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    if dropout and module.training:
        raise ValueError("the Triton attention kernels have no dropout (inference only)")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("sliding-window attention is not supported by the Triton kernels")
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    # [B, H, T, D] -> [B, T, H, D] views
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if is_interpret():
        # the interpreter computes bf16/fp16 wrongly: run it in float32
        q, k, v = q.float(), k.float(), v.float()
    if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("expected a 2D padding mask (register() installs the matching mask function)")
    return q, k, v, attention_mask, bool(causal)


def _finish(o, query):
    return o.to(query.dtype), None


def dense_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    q, k, v, mask, causal = _common(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if mask is not None:
        return _finish(_unpadded(q, k, v, mask, causal, scaling), query)
    if q.shape[1] <= DECODE_MAX_TOKENS and causal:
        return _finish(flash_decode(q, k, v, scale=scaling), query)
    return _finish(flash_prefill(q, k, v, causal=causal, scale=scaling), query)


def hip_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    q, k, v, mask, causal = _common(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    cfg = _config["hip"]
    if mask is not None:
        return _finish(_unpadded(q, k, v, mask, causal, scaling), query)
    B, T = q.shape[:2]
    S = k.shape[1]
    if T > DECODE_MAX_TOKENS or not causal:
        module._retrogram_hip = None  # a new prompt: the decode selection starts over
        o = hip_attention_prefill(q, k, v, causal=causal, scale=scaling, block_size_q=cfg["block_size_q"],
                                  block_size_k=cfg["block_size_k"], topk=cfg["topk"], n_sink=cfg["n_sink"],
                                  n_local=cfg["n_local"], n_rep=cfg["n_rep"], dense_below=cfg["dense_below"],
                                  estimator=cfg["estimator"], top_p=cfg["top_p"], sample_rows=cfg["sample_rows"],
                                  max_blocks=cfg["max_blocks"])
        return _finish(o, query)
    if S < cfg["dense_below"]:
        return _finish(flash_decode(q, k, v, scale=scaling), query)
    state = getattr(module, "_retrogram_hip", None)
    if state is None or state["step"] % cfg["refresh_every"] == 0 or state["sel"].shape[0] != B:
        seqlens = torch.full((B,), S, device=q.device, dtype=torch.int32)
        sel = hip_decode_select(q, k, seqlens, S, block_size_k=cfg["block_size_k"], topk=cfg["topk"],
                                n_sink=cfg["n_sink"], n_local=cfg["n_local"], n_rep=cfg["n_rep"])
        state = {"sel": sel, "step": 0}
        module._retrogram_hip = state
    state["step"] += 1
    o = hip_decode(q, k, v, state["sel"], block_size_k=cfg["block_size_k"], n_sink=cfg["n_sink"],
                   n_local=cfg["n_local"], scale=scaling)
    return _finish(o, query)


def vs_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    q, k, v, mask, causal = _common(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    cfg = _config["vs"]
    if mask is not None:
        return _finish(_unpadded(q, k, v, mask, causal, scaling), query)
    if q.shape[1] <= DECODE_MAX_TOKENS and causal:
        return _finish(flash_decode(q, k, v, scale=scaling), query)
    return _finish(block_sparse_prefill(q, k, v, causal=causal, scale=scaling, **cfg), query)


def register(hip: dict | None = None, vs: dict | None = None) -> tuple[str, ...]:
    """Register the three implementations (and their mask function) with transformers; `hip` / `vs`
    override entries of HIP_DEFAULTS / VS_DEFAULTS. Returns the names."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    for name, over, defaults in (("hip", hip, HIP_DEFAULTS), ("vs", vs, VS_DEFAULTS)):
        if over:
            unknown = set(over) - set(defaults)
            if unknown:
                raise ValueError(f"unknown {name} options: {sorted(unknown)}")
            _config[name].update(over)
    fns = (dense_attention_forward, hip_attention_forward, vs_attention_forward)
    for name, fn in zip(NAMES, fns):
        AttentionInterface.register(name, fn)
        # None when fully causal without padding, else the 2D padding mask
        AttentionMaskInterface.register(name, flash_attention_mask)
    return NAMES
