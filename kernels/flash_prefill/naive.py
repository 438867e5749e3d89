"""Plain PyTorch reference for flash_prefill (run it in float64 for checks)."""

from __future__ import annotations

import torch


def attention_naive(q, k, v, causal=True, scale=None, mask=None):
    """q: [B, T, HQ, D]; k, v: [B, S, HKV, D]; mask: optional bool [B or 1, HQ or 1, T, S] (True = keep).

    Causal is bottom-right aligned (query i sees keys j <= i + S - T). Rows with no visible key
    give 0 and lse -inf. Returns o [B, T, HQ, D] and lse [B, HQ, T] (natural log).
    """
    B, T, HQ, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    G = HQ // HKV
    # [B, HQ, T, D] / [B, HQ, S, D]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(G, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(G, dim=1)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    keep = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.arange(S, device=q.device)[None, :] <= (torch.arange(T, device=q.device) + S - T)[:, None]
    keep = keep[None, None]
    if mask is not None:
        keep = keep & mask
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    o = torch.matmul(p, vh)
    return o.transpose(1, 2), lse


def flash_prefill_naive(q, k, v, causal=True, scale=None, cu_seqlens=None, cu_seqlens_k=None):
    """Reference for flash_prefill, same arguments; varlen runs each sequence separately."""
    if cu_seqlens is None:
        return attention_naive(q, k, v, causal, scale)
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    outs, lses = [], []
    for i in range(cu_seqlens.numel() - 1):
        a, b = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        c, d = int(cu_k[i]), int(cu_k[i + 1])
        o, lse = attention_naive(q[:, a:b], k[:, c:d], v[:, c:d], causal, scale)
        outs.append(o)
        lses.append(lse[0])
    return torch.cat(outs, 1), torch.cat(lses, -1)
