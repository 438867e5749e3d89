"""Plain PyTorch references for flash_decode and sparse_decode (run them in float64 for checks)."""

from __future__ import annotations

import torch

from ..flash_prefill.naive import attention_naive


def gather_cache(k_cache, b, seqlen, block_table=None):
    """The first seqlen keys of sequence b as [1, seqlen, HKV, D] (pages followed through the table)."""
    if block_table is None:
        return k_cache[b : b + 1, :seqlen]
    page = k_cache.shape[1]
    n_pages = -(-seqlen // page)
    pages = k_cache[block_table[b, :n_pages].long()]  # [n_pages, page, HKV, D]
    return pages.reshape(1, n_pages * page, *k_cache.shape[2:])[:, :seqlen]


def sparse_decode_keep(seqlen, sel_row, n_sink, n_local, block_n):
    """Bool [seqlen] keys kept by sparse_decode for one (sequence, KV head)."""
    nkb = -(-seqlen // block_n)
    blocks = torch.zeros(nkb, dtype=torch.bool)
    blocks[: min(n_sink, nkb)] = True
    blocks[max(n_sink, nkb - n_local) :] = True
    for kb in sel_row.tolist():
        if n_sink <= kb < nkb - n_local:
            blocks[kb] = True
    return blocks.repeat_interleave(block_n)[:seqlen]


def flash_decode_naive(q, k_cache, v_cache, seqlens=None, block_table=None, scale=None,
                       sel=None, n_sink=0, n_local=0, block_n=64):
    """Reference for flash_decode (and for sparse_decode when sel [B, HKV, K] is given)."""
    B, TQ, HQ, D = q.shape
    HKV = k_cache.shape[2]
    G = HQ // HKV
    outs = []
    for b in range(B):
        L = k_cache.shape[1] if seqlens is None else int(seqlens[b])
        kb = gather_cache(k_cache, b, L, block_table)
        vb = gather_cache(v_cache, b, L, block_table)
        mask = None
        if sel is not None:
            # [1, HQ, 1, L]: per KV head, shared by its G query heads
            keep = torch.stack([sparse_decode_keep(L, sel[b, h], n_sink, n_local, block_n) for h in range(HKV)])
            mask = keep.repeat_interleave(G, 0)[None, :, None, :].to(q.device)
        o, _ = attention_naive(q[b : b + 1], kb, vb, causal=True, scale=scale, mask=mask)
        outs.append(o)
    return torch.cat(outs, 0)
