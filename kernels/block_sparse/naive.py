"""Plain PyTorch reference for block_sparse_attention (run it in float64 for checks)."""

from __future__ import annotations

import torch

from ..flash_prefill.naive import attention_naive


def block_mask_dense(block_idx, block_cnt, T, S, block_size_q, block_size_k, n_heads):
    """Expand block lists [B, HI, NQB, MAXK] into a bool token mask [B, n_heads, T, S]."""
    B, HI, NQB, MAXK = block_idx.shape
    nkb = -(-S // block_size_k)
    valid = torch.arange(MAXK, device=block_idx.device)[None, None, None, :] < block_cnt[..., None].long()
    blocks = torch.zeros(B, HI, NQB, nkb + 1, dtype=torch.bool, device=block_idx.device)
    # invalid slots go to the spare column nkb, dropped below
    idx = torch.where(valid, block_idx.long(), torch.full_like(block_idx.long(), nkb))
    blocks.scatter_(-1, idx, torch.ones_like(idx, dtype=torch.bool))
    blocks = blocks[..., :nkb]
    tok = blocks.repeat_interleave(block_size_q, 2)[:, :, :T].repeat_interleave(block_size_k, 3)[..., :S]
    return tok.repeat_interleave(n_heads // HI, 1)


def block_sparse_attention_naive(q, k, v, block_idx, block_cnt, block_size_q, block_size_k,
                                 causal=True, scale=None):
    """Dense attention restricted to the listed blocks (and causal); returns o [B, T, HQ, D]."""
    T, HQ, S = q.shape[1], q.shape[2], k.shape[1]
    mask = block_mask_dense(block_idx, block_cnt, T, S, block_size_q, block_size_k, HQ)
    return attention_naive(q, k, v, causal=causal, scale=scale, mask=mask)[0]
