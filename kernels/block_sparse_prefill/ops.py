"""MInference-style vertical-slash sparse prefill on the block-sparse core.

A vertical-slash pattern is the union of key blocks every query looks at (vertical lines) and of
query-key offsets (slash lines: diagonals, e.g. the local window or periodic structure). The best
`n_vertical` key blocks and `n_slash` block-diagonals, plus the sink blocks and the first `n_local`
diagonals, become per-query-block lists for block_sparse_attention. Two estimators score them:

- "mass" (default): the sampled exact attention of `sample_rows` rows of every query block
  (block_sparse.sampled_block_mass, the estimator of HiP's "mass" prefill) gives each (query block,
  key block) its attention mass; vertical scores are the mean mass of each key block and slash scores
  the mean mass of each block-diagonal, over the query blocks that see them. The pattern is then
  completed per head and query block with the fewest further blocks, by decreasing mass, that bring
  the kept mass to `top_p` (block_sparse.topp_block_list): the recall bound of HiP's "mass" prefill,
  with the vertical-slash blocks counted towards it.
- "last_q" (MInference): the last `last_q` queries are scored against every key (one small dense
  product); their attention is summed per key block and per block-diagonal. A fixed budget with no
  recall bound (the pattern of the last queries is assumed for all).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..block_sparse.ops import block_sparse_attention, sampled_block_mass, topp_block_list
from ..flash_prefill.ops import flash_prefill
from ..hip_attention.ops import prefill_kend
from ..utils import check_gqa, default_scale, is_interpret

_BIG = 1 << 30


def vertical_slash_scores(q, k, last_q=64, scale=None, causal=True, head_chunk=8, block_size_k=64):
    """Attention mass of the last `last_q` queries per key block (vertical) and per block-offset
    (slash, offset = query position - key position). Returns two [B, HQ, cdiv(S, block_size_k)] float32."""
    B, T, HQ, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    G = check_gqa(HQ, HKV)
    scale = default_scale(D, scale)
    L = min(last_q, T)
    nkb = triton.cdiv(S, block_size_k)
    dev = q.device
    pos = torch.arange(T - L, T, device=dev) + (S - T)  # [L] key-axis positions of the last queries
    cols = torch.arange(S, device=dev)
    visible = cols[None, :] <= pos[:, None] if causal else torch.ones(L, S, dtype=torch.bool, device=dev)
    # offset o of key j for query i is pos_i - j: gather index j = pos_i - o
    offs_idx = pos[:, None] - cols[None, :]  # [L, S] (row i, offset o) -> key index
    offs_ok = (offs_idx >= 0) & (offs_idx < S)
    offs_idx = offs_idx.clamp(0, S - 1)
    vert = torch.zeros(B, HQ, nkb * block_size_k, device=dev, dtype=torch.float32)
    slash = torch.zeros(B, HQ, nkb * block_size_k, device=dev, dtype=torch.float32)
    qs = q[:, T - L:]
    for h0 in range(0, HQ, head_chunk):
        h1 = min(HQ, h0 + head_chunk)
        kh = k[:, :, torch.arange(h0, h1, device=dev) // G]  # [B, S, Hc, D]
        s = torch.einsum("blhd,bshd->bhls", qs[:, :, h0:h1].float(), kh.float()) * scale
        s = s.masked_fill(~visible, float("-inf"))
        p = torch.softmax(s, dim=-1)  # [B, Hc, L, S]
        vert[:, h0:h1, :S] = p.sum(2)
        ps = p.gather(-1, offs_idx[None, None].expand(B, h1 - h0, L, S)) * offs_ok
        slash[:, h0:h1, :S] = ps.sum(2)
        del s, p, ps
    return vert.view(B, HQ, nkb, block_size_k).sum(-1), slash.view(B, HQ, nkb, block_size_k).sum(-1)


@triton.jit
def mass_vertical_slash_scores_fwd_kernel(
    mass, nvis, d0, d_last, vert, slash, NQB, NKB,
    LAST_PARTIAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (column chunk c, batch x head): vert and slash for key blocks / block-diagonals
    c * BLOCK_K ... by a sweep over all query blocks. A full key block kb of query block qb lies on
    diagonal d0[qb] - kb, so diagonal d reads mass[qb, d0[qb] - d]: a gather along the diagonal instead
    of a scatter into it (no atomics); a partial last key block lies on d_last[qb]."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    offs = i_c * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = offs < NKB
    base = mass + i_bh.to(tl.int64) * NQB * NKB
    n_full_kb = NKB - 1 if LAST_PARTIAL else NKB
    acc_v = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_K], dtype=tl.float32)
    n_v = tl.zeros([BLOCK_K], dtype=tl.int32)
    n_s = tl.zeros([BLOCK_K], dtype=tl.int32)
    for q0 in range(0, NQB, BLOCK_Q):
        qb = q0 + tl.arange(0, BLOCK_Q)
        q_ok = qb < NQB
        nv = tl.load(nvis + qb, mask=q_ok, other=0)
        rows = base + qb[:, None].to(tl.int64) * NKB
        ok = q_ok[:, None] & col_ok[None, :] & (offs[None, :] < nv[:, None])
        acc_v += tl.sum(tl.load(rows + offs[None, :], mask=ok, other=0.0), 0)
        n_v += tl.sum(ok.to(tl.int32), 0)
        kb = tl.load(d0 + qb, mask=q_ok, other=0)[:, None] - offs[None, :]
        ok = q_ok[:, None] & col_ok[None, :] & (kb >= 0) & (kb < n_full_kb) & (kb < nv[:, None])
        acc_s += tl.sum(tl.load(rows + kb, mask=ok, other=0.0), 0)
        n_s += tl.sum(ok.to(tl.int32), 0)
        if LAST_PARTIAL:
            lok = q_ok & (NKB - 1 < nv)
            ml = tl.load(rows + NKB - 1, mask=lok[:, None], other=0.0)  # [BLOCK_Q, 1]
            ok = lok[:, None] & col_ok[None, :] & (tl.load(d_last + qb, mask=q_ok, other=-1)[:, None] == offs[None, :])
            acc_s += tl.sum(tl.where(ok, ml, 0.0), 0)
            n_s += tl.sum(ok.to(tl.int32), 0)
    out = i_bh.to(tl.int64) * NKB + offs
    tl.store(vert + out, acc_v / tl.maximum(n_v, 1).to(tl.float32), mask=col_ok)
    tl.store(slash + out, acc_s / tl.maximum(n_s, 1).to(tl.float32), mask=col_ok)


def mass_vertical_slash_scores(mass, T, S, block_size_q=64, block_size_k=64, causal=True):
    """Vertical and slash scores from block masses mass [B, H, NQB, NKB] (rows summing to 1, e.g. from
    sampled_block_mass): vertical[kb] = mean mass of key block kb over the query blocks that see it;
    slash[d] = mean mass of block-diagonal d over the query blocks that have it, where (query block qb,
    key block kb) lies on d = floor((centre of qb - centre of kb) / block_size_k) on the key axis
    (bottom-right aligned). Returns two [B, H, NKB] float32."""
    B, H, NQB, NKB = mass.shape
    dev = mass.device
    nvis = ((prefill_kend(T, S, block_size_q, causal, dev) + block_size_k - 1) // block_size_k).to(torch.int32)
    delta = S - T if causal else 0
    m0 = torch.arange(NQB, device=dev) * block_size_q
    qc2 = m0 + torch.clamp(m0 + block_size_q, max=T) - 1 + 2 * delta  # twice the query-block centres
    # twice the centre of key block kb is 2 kb bk + bk - 1 when full: d = d0 - kb
    d0 = torch.div(qc2 - (block_size_k - 1), 2 * block_size_k, rounding_mode="floor").to(torch.int32)
    k_last = (NKB - 1) * block_size_k
    d_last = torch.div(qc2 - (k_last + S - 1), 2 * block_size_k, rounding_mode="floor").to(torch.int32)
    mass = mass.float().contiguous()
    vert = torch.empty((B, H, NKB), device=dev, dtype=torch.float32)
    slash = torch.empty_like(vert)
    if vert.numel() == 0:
        return vert, slash
    block_k = 16 if is_interpret() else 128
    mass_vertical_slash_scores_fwd_kernel[(triton.cdiv(NKB, block_k), B * H)](
        mass, nvis, d0, d_last, vert, slash, NQB, NKB,
        LAST_PARTIAL=S % block_size_k != 0, BLOCK_Q=8 if is_interpret() else 16, BLOCK_K=block_k, num_warps=4,
    )
    return vert, slash


def vs_pattern(vert, slash, T, S, block_size_q=64, block_size_k=64, n_vertical=32, n_slash=16, n_sink=1,
               n_local=2, causal=True):
    """Key-block candidates of a vertical-slash pattern: the sink blocks, the `n_vertical` best key
    blocks by vert and the blocks crossed by the first `n_local` and the `n_slash` best further
    block-diagonals by slash ([B, H, NKB] each). Returns cand [B, H, NQB, E] int64, unsorted, with
    duplicates, blocks not visible to the query block set to -1."""
    B, HQ, nkb = vert.shape
    dev = vert.device
    nqb = triton.cdiv(T, block_size_q)
    vert, slash = vert.clone(), slash.clone()
    # always-kept parts are excluded from the competition
    vert[..., :n_sink] = float("-inf")
    slash[..., :n_local] = float("-inf")
    nv = max(0, min(n_vertical, nkb - n_sink))
    ns = max(0, min(n_slash, nkb - n_local))
    v_sel = vert.topk(nv, -1).indices if nv else vert.new_zeros(B, HQ, 0, dtype=torch.long)
    d_sel = slash.topk(ns, -1).indices if ns else slash.new_zeros(B, HQ, 0, dtype=torch.long)
    sink = torch.arange(min(n_sink, nkb), device=dev).expand(B, HQ, -1)
    d_all = torch.cat([torch.arange(min(n_local, nkb), device=dev).expand(B, HQ, -1), d_sel], -1)

    m0 = torch.arange(nqb, device=dev) * block_size_q
    m1 = torch.clamp(m0 + block_size_q, max=T) - 1
    delta = S - T if causal else 0
    p0, p1 = m0 + delta, m1 + delta  # [NQB] key-axis positions of each block's first/last query
    kend = torch.clamp(p1 + 1, 0, S) if causal else torch.full_like(p1, S)
    # a block-diagonal d (offsets [d*BK, (d+1)*BK)) crosses key blocks lo..hi for a query block
    span = triton.cdiv(block_size_q, block_size_k) + 1
    hi = torch.div(p1[None, None, :, None] - d_all[:, :, None, :] * block_size_k, block_size_k, rounding_mode="floor")
    lo = torch.div(p0[None, None, :, None] - (d_all[:, :, None, :] + 1) * block_size_k + 1, block_size_k,
                   rounding_mode="floor")
    sl = hi[..., None] - torch.arange(span, device=dev)  # [B, HQ, NQB, nd, span]
    sl = torch.where(sl >= lo[..., None], sl, -1).flatten(-2)
    cand = torch.cat([sink[:, :, None, :].expand(B, HQ, nqb, -1), v_sel[:, :, None, :].expand(B, HQ, nqb, -1), sl], -1)
    ok = (cand >= 0) & (cand * block_size_k < kend[None, None, :, None])
    return torch.where(ok, cand, -1)


def _pack(cand):
    """Candidates [..., E] (-1 = none, duplicates allowed) -> ascending unique lists and counts."""
    cand = torch.where(cand >= 0, cand, _BIG).sort(-1).values
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[..., 1:] = cand[..., 1:] == cand[..., :-1]
    cand = torch.where(dup, _BIG, cand).sort(-1).values
    cnt = (cand < _BIG).sum(-1).to(torch.int32)
    cand = cand[..., : max(1, int(cnt.max().item()))] if cand.numel() else cand
    return torch.where(cand == _BIG, 0, cand).to(torch.int32), cnt


def vertical_slash_blocks(q, k, block_size_q=64, block_size_k=64, last_q=64, n_vertical=32, n_slash=16,
                          n_sink=1, n_local=2, causal=True, scale=None, estimator="mass", top_p=0.95,
                          sample_rows=4, max_blocks=None):
    """Per-query-block key-block lists from vertical-slash estimation (see the module docstring for the
    estimators; top_p, sample_rows and max_blocks, a cap on the top-p completion, apply to "mass").

    Returns block_idx [B, HQ, NQB, MAXK] int32 (ascending, packed) and block_cnt [B, HQ, NQB]."""
    T, S = q.shape[1], k.shape[1]
    if estimator == "last_q":
        vert, slash = vertical_slash_scores(q, k, last_q, scale, causal, block_size_k=block_size_k)
        return _pack(vs_pattern(vert, slash, T, S, block_size_q, block_size_k, n_vertical, n_slash, n_sink, n_local,
                                causal))
    if estimator != "mass":
        raise ValueError(f"unknown estimator {estimator!r} (expected 'mass' or 'last_q')")
    mass = sampled_block_mass(q, k, block_size_q, block_size_k, sample_rows, causal, scale)
    vert, slash = mass_vertical_slash_scores(mass, T, S, block_size_q, block_size_k, causal)
    cand = vs_pattern(vert, slash, T, S, block_size_q, block_size_k, n_vertical, n_slash, n_sink, n_local, causal)
    kend = prefill_kend(T, S, block_size_q, causal, q.device)
    # the local diagonals of the pattern may reach one block further back than topp_block_list's
    # n_local last blocks: they are all in extra_idx, so the kept set is pattern ∪ top-p completion
    return topp_block_list(mass, kend, block_size_k, top_p, n_sink, n_local, max_blocks=max_blocks, extra_idx=cand)


def block_sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    block_size_q: int = 64,
    block_size_k: int = 64,
    last_q: int = 64,
    n_vertical: int = 32,
    n_slash: int = 16,
    n_sink: int = 1,
    n_local: int = 2,
    dense_below: int = 8192,
    return_blocks: bool = False,
    out: torch.Tensor | None = None,
    estimator: str = "mass",
    top_p: float = 0.95,
    sample_rows: int = 4,
    max_blocks: int | None = None,
):
    """Vertical-slash sparse prefill. q: [B, T, HQ, D]; k, v: [B, S, HKV, D]; dense flash_prefill
    below dense_below keys. estimator "mass" (default): the pattern estimated from sampled exact rows
    of every query block, completed per head and query block to `top_p` of the estimated attention
    mass (at most `max_blocks` blocks added when given); "last_q": MInference's fixed-budget pattern of
    the last `last_q` queries. Returns o [B, T, HQ, D] (and (block_idx, block_cnt) with return_blocks)."""
    S = k.shape[1]
    if S < dense_below:
        o = flash_prefill(q, k, v, causal=causal, scale=scale, out=out)
        return (o, None) if return_blocks else o
    blocks = vertical_slash_blocks(q, k, block_size_q, block_size_k, last_q, n_vertical, n_slash, n_sink,
                                   n_local, causal, scale, estimator, top_p, sample_rows, max_blocks)
    o = block_sparse_attention(q, k, v, *blocks, block_size_q, block_size_k, causal=causal, scale=scale, out=out)
    return (o, blocks) if return_blocks else o
