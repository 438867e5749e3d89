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


def sampled_block_mass_naive(q, k, block_size_q=64, block_size_k=64, rows=4, causal=True, scale=None):
    """Reference for ops.sampled_block_mass: the same sampled rows (the last row of each of `rows`
    equal parts of a query block), their exact softmax, summed per key block, mean over the rows."""
    B, T, HQ, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    G = HQ // HKV
    scale = D**-0.5 if scale is None else scale
    nqb, nkb = -(-T // block_size_q), -(-S // block_size_k)
    out = torch.zeros(B, HQ, nqb, nkb, dtype=torch.float64)
    for qb in range(nqb):
        for i in range(rows):
            t = min(T - 1, qb * block_size_q + block_size_q - 1 - i * (block_size_q // rows))
            n = min(S, t + 1 + S - T) if causal else S
            s = torch.einsum("bhd,bshd->bhs", q[:, t].double(), k[:, :n].double().repeat_interleave(G, 2)) * scale
            p = torch.softmax(s, -1)
            p = torch.nn.functional.pad(p, (0, nkb * block_size_k - n)).view(B, HQ, nkb, block_size_k).sum(-1)
            out[:, :, qb] += p.cpu() / rows
    return out
