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


def topp_block_list_naive(mass, kend, block_size_k, top_p=0.95, n_sink=1, n_local=2, max_blocks=None, extra_idx=None):
    """Sort-based reference of ops.topp_block_list (same contract and result, up to ties in mass)."""
    _BIG = 1 << 30
    B, H, NQB, NKB = mass.shape
    dev = mass.device
    if kend.dim() == 1:
        kend = kend[None].expand(B, -1)
    nkb_q = ((kend + block_size_k - 1) // block_size_k)[:, None, :, None]  # [B, 1, NQB, 1]
    kb = torch.arange(NKB, device=dev).view(1, 1, 1, -1)
    vis = kb < nkb_q
    base = vis & ((kb < n_sink) | (kb >= nkb_q - n_local))
    if extra_idx is not None:
        extra_idx = extra_idx.long()
        e_ok = (extra_idx >= 0) & (extra_idx < nkb_q)
        extra_idx = torch.where(e_ok, extra_idx, _BIG)
        hit = torch.zeros(B, H, NQB, NKB + 1, dtype=torch.bool, device=dev)
        hit.scatter_(-1, extra_idx.clamp(max=NKB), True)
        base = base | hit[..., :NKB]
    covered = (mass * base).sum(-1, keepdim=True)
    rest = torch.where(vis & ~base, mass, -1.0)
    vals, order = rest.sort(-1, descending=True)
    w = vals.clamp(min=0)
    before = covered + w.cumsum(-1) - w  # mass kept before taking each candidate
    n = ((before < top_p) & (vals >= 0)).sum(-1, keepdim=True)  # the one that crosses top_p included
    if max_blocks is not None:
        n = n.clamp(max=max_blocks)
    n = torch.minimum(n, (vals >= 0).sum(-1, keepdim=True))
    width = max(1, int(n.max().item()))
    rank = torch.arange(width, device=dev).view(1, 1, 1, -1)
    chosen = torch.where(rank < n, order[..., :width], _BIG)
    n_base = n_sink + n_local
    bidx = torch.cat([torch.arange(n_sink, device=dev), -1 - torch.arange(n_local, device=dev)]).view(1, 1, 1, -1)
    bidx = torch.where(bidx >= 0, bidx, nkb_q + bidx).expand(B, H, NQB, n_base)
    bok = torch.gather(base.expand(B, H, NQB, NKB), -1, bidx.clamp(0, NKB - 1)) & (bidx >= 0)
    # a block that is both sink and local appears once
    dup = torch.zeros_like(bok)
    dup[..., n_sink:] = (bidx[..., n_sink:, None] == bidx[..., None, :n_sink]).any(-1) if n_sink else False
    bidx = torch.where(bok & ~dup, bidx, _BIG)
    parts = [bidx, chosen]
    if extra_idx is not None:
        # extra blocks that are not sink/local blocks, each once (the chosen ones exclude all of base)
        ex = extra_idx.sort(-1).values
        ex_dup = torch.zeros_like(ex, dtype=torch.bool)
        ex_dup[..., 1:] = ex[..., 1:] == ex[..., :-1]
        ex_base = (ex < n_sink) | (ex >= nkb_q - n_local)
        parts.append(torch.where(ex_dup | ex_base, _BIG, ex))
    idx = torch.cat(parts, -1).sort(-1).values
    cnt = (idx < _BIG).sum(-1).to(torch.int32)
    idx = idx[..., : max(1, int(cnt.max().item()))]
    return torch.where(idx >= _BIG, 0, idx).to(torch.int32), cnt
