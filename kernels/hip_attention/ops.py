"""HiP attention (hierarchically pruned attention, training-free): per query block, keep the best
key blocks found by iterative halving, then attend only to them.

Mask estimation: the middle key range of each query block (everything but the sink blocks at the
start and the local blocks just before the query) is cut into `topk` equal segments; each step
halves every segment, scores each half by one or a few representative keys (the largest q.k over
the block's queries, computed by `hip_score_fwd_kernel`), and keeps the `topk` best halves, until
the segments are single key blocks: O(topk * log(T / topk)) key reads per query block instead of
T. Sink and local blocks are always kept. Attention then runs on the block-sparse core (prefill) or
on the flash-decoding kernel in sparse mode (decode, selection refreshed every few steps).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..block_sparse.ops import block_sparse_attention, sampled_block_mass, topp_block_list
from ..flash_decode.ops import sparse_decode
from ..flash_prefill.ops import flash_prefill
from ..utils import check_gqa, check_last_dim_contiguous, is_interpret, next_pow2

_BIG = 1 << 30


@triton.jit
def key_rows(k, block_table, i_b, i_hk, pos, ok, offs_d, page_size, stride_kb, stride_kt, stride_kh, stride_btb,
             PAGED: tl.constexpr):
    """The keys at token positions pos ([N]) of sequence i_b, KV head i_hk: [N, D] (zeros where not ok),
    from a contiguous cache or through the block table of a paged one."""
    if PAGED:
        page = tl.load(block_table + i_b.to(tl.int64) * stride_btb + pos // page_size, mask=ok, other=0)
        off = page.to(tl.int64) * stride_kb + (pos % page_size) * stride_kt
    else:
        off = i_b.to(tl.int64) * stride_kb + pos.to(tl.int64) * stride_kt
    return tl.load(k + off[:, None] + i_hk * stride_kh + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def hip_score_fwd_kernel(
    q, k, rep, score, block_table,
    T_q, NHS, NQB, C, page_size,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh, stride_btb,
    GS: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, D: tl.constexpr, PAGED: tl.constexpr,
):
    """score[u, c] = max over the unit's query rows of q . k[rep[u, c]] (-inf where rep < 0).

    A unit u = (b, hs, qb) holds BLOCK_Q queries of GS query heads: row r -> (token qb*BLOCK_Q + r//GS,
    head hs*GS + r%GS); GS = 1 gives a selection per query head, GS = G one per KV head.
    """
    u = tl.program_id(0)
    i_qb = u % NQB
    i_b = u // (NQB * NHS)
    i_hs = (u // NQB) % NHS
    i_hk = (i_hs * GS) // G
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    t_r = i_qb * BLOCK_Q + offs_r // GS
    h_r = i_hs * GS + offs_r % GS
    row_ok = (offs_r < BLOCK_Q * GS) & (t_r < T_q)
    # [BLOCK_R, D]
    qt = tl.load(q + i_b.to(tl.int64) * stride_qb + t_r[:, None] * stride_qt + h_r[:, None] * stride_qh
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        pos = tl.load(rep + u.to(tl.int64) * C + offs_c, mask=offs_c < C, other=-1)
        ok = pos >= 0
        # [BLOCK_C, D]
        kk = key_rows(k, block_table, i_b, i_hk, pos, ok, offs_d, page_size, stride_kb, stride_kt, stride_kh,
                      stride_btb, PAGED)
        s = tl.dot(qt, tl.trans(kk))
        s = tl.where(row_ok[:, None], s, float("-inf"))
        best = tl.where(ok, tl.max(s, 0), float("-inf"))
        tl.store(score + u.to(tl.int64) * C + offs_c, best, mask=offs_c < C)


def score_triton(q, k, rep, block_size_q, group_heads, block_table=None):
    """rep [B, HS, NQB, C] int (key positions, -1 = none) -> scores [B, HS, NQB, C] float32."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = check_gqa(HQ, HKV)
    check_last_dim_contiguous(q, k)
    _, HS, NQB, C = rep.shape
    GS = G if group_heads else 1
    rep = rep.to(torch.int32).contiguous()
    score = torch.empty(rep.shape, device=q.device, dtype=torch.float32)
    if rep.numel() == 0:
        return score
    paged = block_table is not None
    block_r = max(16, next_pow2(block_size_q * GS))
    block_c = 16 if is_interpret() else 64
    hip_score_fwd_kernel[(B * HS * NQB,)](
        q, k, rep, score, block_table if paged else rep,
        T, HS, NQB, C, k.shape[1] if paged else 1,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), block_table.stride(0) if paged else 0,
        GS=GS, G=G, BLOCK_Q=block_size_q, BLOCK_R=block_r, BLOCK_C=block_c, D=D, PAGED=paged,
        num_warps=4 if block_r <= 64 else 8, num_stages=1 if is_interpret() else 2,
    )
    return score


@triton.jit
def hip_bound_score_fwd_kernel(
    q, kmax, kmin, r1, r2, score,
    T_q, NHS, NQB, C, HKV,
    stride_qb, stride_qt, stride_qh,
    GS: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, D: tl.constexpr,
):
    """score[u, c] = max over the unit's query rows of the Quest-style upper bound of q . k over the
    keys of a segment: sum_d max(q_d kmax_d, q_d kmin_d) = q+ . kmax + q- . kmin, where kmax/kmin are
    the channel-wise extremes of the segment, read as the union of two sparse-table rows r1, r2."""
    u = tl.program_id(0)
    i_qb = u % NQB
    i_b = u // (NQB * NHS)
    i_hs = (u // NQB) % NHS
    i_hk = (i_hs * GS) // G
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    t_r = i_qb * BLOCK_Q + offs_r // GS
    h_r = i_hs * GS + offs_r % GS
    row_ok = (offs_r < BLOCK_Q * GS) & (t_r < T_q)
    qt = tl.load(q + i_b.to(tl.int64) * stride_qb + t_r[:, None] * stride_qt + h_r[:, None] * stride_qh
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    zero = tl.zeros_like(qt)
    q_pos = tl.maximum(qt, zero)
    q_neg = tl.minimum(qt, zero)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(r1 + u.to(tl.int64) * C + offs_c, mask=offs_c < C, other=-1)
        b = tl.load(r2 + u.to(tl.int64) * C + offs_c, mask=offs_c < C, other=-1)
        ok = a >= 0
        oa = (a.to(tl.int64) * HKV + i_hk) * D
        ob = (b.to(tl.int64) * HKV + i_hk) * D
        m = ok[:, None]
        kx = tl.maximum(tl.load(kmax + oa[:, None] + offs_d[None, :], mask=m, other=0.0),
                        tl.load(kmax + ob[:, None] + offs_d[None, :], mask=m, other=0.0))
        kn = tl.minimum(tl.load(kmin + oa[:, None] + offs_d[None, :], mask=m, other=0.0),
                        tl.load(kmin + ob[:, None] + offs_d[None, :], mask=m, other=0.0))
        s = tl.dot(q_pos, tl.trans(kx)) + tl.dot(q_neg, tl.trans(kn))
        s = tl.where(row_ok[:, None], s, float("-inf"))
        best = tl.where(ok, tl.max(s, 0), float("-inf"))
        tl.store(score + u.to(tl.int64) * C + offs_c, best, mask=offs_c < C)


def key_bound_tables(k: torch.Tensor, block_size_k: int):
    """Sparse tables of channel-wise key extremes: level l row i covers key blocks [i, i + 2^l).
    k: [B, S, HKV, D] -> (kmax, kmin) [L, B, nkb, HKV, D] in k's dtype, L = floor(log2(nkb)) + 1.
    One pass over K; padding past S repeats the last key (a real key, so bounds stay valid)."""
    B, S, HKV, D = k.shape
    nkb = triton.cdiv(S, block_size_k)
    pad = nkb * block_size_k - S
    kk = torch.cat([k, k[:, -1:].expand(B, pad, HKV, D)], 1) if pad else k
    kk = kk.view(B, nkb, block_size_k, HKV, D)
    mx, mn = [kk.amax(2)], [kk.amin(2)]
    step = 1
    while 2 * step <= nkb:
        a, b = mx[-1], mn[-1]
        nx, nn = a.clone(), b.clone()
        nx[:, : nkb - step] = torch.maximum(a[:, : nkb - step], a[:, step:])
        nn[:, : nkb - step] = torch.minimum(b[:, : nkb - step], b[:, step:])
        mx.append(nx)
        mn.append(nn)
        step *= 2
    return torch.stack(mx).contiguous(), torch.stack(mn).contiguous()


def bound_rows(cs, ce, B, nkb):
    """Sparse-table rows (flat indices into [L, B, nkb]) whose union is the block range [cs, ce)."""
    n = (ce - cs).clamp(min=1)
    lvl = torch.floor(torch.log2(n.double())).long()
    lvl = torch.where((1 << (lvl + 1)) <= n, lvl + 1, lvl)  # guard log2 rounding
    lvl = torch.where((1 << lvl) > n, lvl - 1, lvl)
    b_idx = torch.arange(B, device=cs.device).view(B, *([1] * (cs.dim() - 1)))
    base = (lvl * B + b_idx) * nkb
    empty = ce <= cs
    r1 = torch.where(empty, -1, base + cs)
    r2 = torch.where(empty, -1, base + ce - (1 << lvl))
    return r1, r2


def bound_score_triton(q, tables, r1, r2, block_size_q, group_heads):
    """Upper-bound scores [B, HS, NQB, C] of the block ranges given by sparse-table rows r1, r2."""
    kmax, kmin = tables
    B, T, HQ, D = q.shape
    HKV = kmax.shape[3]
    G = check_gqa(HQ, HKV)
    check_last_dim_contiguous(q)
    _, HS, NQB, C = r1.shape
    GS = G if group_heads else 1
    r1 = r1.to(torch.int32).contiguous()
    r2 = r2.to(torch.int32).contiguous()
    score = torch.empty(r1.shape, device=q.device, dtype=torch.float32)
    if r1.numel() == 0:
        return score
    block_r = max(16, next_pow2(block_size_q * GS))
    hip_bound_score_fwd_kernel[(B * HS * NQB,)](
        q, kmax, kmin, r1, r2, score, T, HS, NQB, C, HKV,
        q.stride(0), q.stride(1), q.stride(2),
        GS=GS, G=G, BLOCK_Q=block_size_q, BLOCK_R=block_r, BLOCK_C=16 if is_interpret() else 32, D=D,
        num_warps=4 if block_r <= 64 else 8, num_stages=1 if is_interpret() else 2,
    )
    return score


def prefill_kend(T: int, S: int, block_size_q: int, causal: bool, device) -> torch.Tensor:
    """Number of keys visible to each query block: [cdiv(T, block_size_q)] int64 (bottom-right causal)."""
    nqb = triton.cdiv(T, block_size_q)
    if not causal:
        return torch.full((nqb,), S, device=device, dtype=torch.int64)
    last_q = torch.clamp((torch.arange(nqb, device=device) + 1) * block_size_q, max=T)
    return torch.clamp(last_q + S - T, min=0, max=S)


def hip_select(
    q: torch.Tensor,
    k: torch.Tensor,
    kend: torch.Tensor,
    max_kend: int,
    block_size_q: int = 64,
    block_size_k: int = 64,
    topk: int = 32,
    n_sink: int = 1,
    n_local: int = 4,
    n_rep: int = 1,
    group_heads: bool = False,
    block_table: torch.Tensor | None = None,
    scorer=None,
    estimator: str = "rep",
    bound_scorer=None,
) -> torch.Tensor:
    """Hierarchical top-k key-block selection.

    q: [B, T, HQ, D]; k: [B, S, HKV, D] (or paged pages with block_table); kend: [B, NQB] or [NQB]
    keys visible to each query block; max_kend: an upper bound of kend (host int).
    Returns sel [B, HS, NQB, topk] int32: chosen middle key blocks (in [n_sink, nkb - n_local)),
    ascending, -1 padded at the end; HS = HKV if group_heads else HQ.
    estimator: "rep" scores a segment by n_rep representative keys (HiP; reads only those keys);
    "bound" by the Quest-style upper bound of q . k over all of the segment's keys, from sparse tables
    of channel-wise key extremes (one extra pass over K; contiguous caches only).
    scorer(q, k, rep, block_size_q, group_heads, block_table) -> scores; default: the Triton kernel;
    bound_scorer(q, tables, r1, r2, block_size_q, group_heads) likewise for "bound".
    """
    scorer = scorer or score_triton
    bound_scorer = bound_scorer or bound_score_triton
    if estimator not in ("rep", "bound"):
        raise ValueError(f"unknown estimator {estimator!r}")
    if estimator == "bound" and block_table is not None:
        raise ValueError("the bound estimator needs a contiguous key cache")
    B, T, HQ, D = q.shape
    HS = k.shape[2] if group_heads else HQ
    if kend.dim() == 1:
        kend = kend[None].expand(B, -1)
    NQB = kend.shape[1]
    dev = q.device
    nkb = (kend + block_size_k - 1) // block_size_k
    lo = n_sink
    M = torch.clamp(nkb - n_local - lo, min=0)  # [B, NQB] middle blocks
    i = torch.arange(topk + 1, device=dev)
    bounds = lo + (M[..., None] * i) // topk  # [B, NQB, topk + 1]
    s = bounds[..., :-1][:, None].expand(B, HS, NQB, topk).contiguous()
    e = bounds[..., 1:][:, None].expand(B, HS, NQB, topk).contiguous()
    m_max = max(0, triton.cdiv(max_kend, block_size_k) - n_local - lo)
    l_max = triton.cdiv(m_max, topk) if m_max > 0 else 0
    n_iter = math.ceil(math.log2(l_max)) if l_max > 1 else 0
    r = torch.arange(n_rep, device=dev)
    tables = key_bound_tables(k, block_size_k) if estimator == "bound" and n_iter > 0 else None
    for _ in range(n_iter):
        half = s + (e - s + 1) // 2
        cs = torch.cat([s, half], -1)  # [B, HS, NQB, 2 topk]
        ce = torch.cat([half, e], -1)
        empty = ce <= cs
        if tables is not None:
            r1, r2 = bound_rows(cs, ce, B, tables[0].shape[2])
            sc = bound_scorer(q, tables, r1, r2, block_size_q, group_heads)
        else:
            # n_rep keys spread evenly over each half
            span = (ce - cs) * block_size_k
            rep = cs[..., None] * block_size_k + (span[..., None] * (2 * r + 1)) // (2 * n_rep)
            rep = torch.where(empty[..., None], -1, rep).flatten(-2)
            sc = scorer(q, k, rep, block_size_q, group_heads, block_table).view(*cs.shape, n_rep).amax(-1)
        sc = sc.masked_fill(empty, float("-inf"))
        top = sc.topk(topk, dim=-1).indices
        s = cs.gather(-1, top)
        e = ce.gather(-1, top)
    sel = torch.where(e > s, s, _BIG).sort(-1).values
    return torch.where(sel == _BIG, -1, sel).to(torch.int32)


def hip_block_list(sel: torch.Tensor, kend: torch.Tensor, block_size_k: int, n_sink: int, n_local: int):
    """Prefill block lists: sink + selected + local blocks, ascending and packed.

    sel: [B, HS, NQB, K]; kend: [B, NQB] or [NQB]. Returns block_idx [B, HS, NQB, n_sink+K+n_local]
    int32 and block_cnt [B, HS, NQB] int32."""
    B, HS, NQB, K = sel.shape
    dev = sel.device
    if kend.dim() == 1:
        kend = kend[None].expand(B, -1)
    nkb = ((kend + block_size_k - 1) // block_size_k)[:, None, :, None]  # [B, 1, NQB, 1]
    sink = torch.arange(n_sink, device=dev).view(1, 1, 1, -1)
    sink = torch.where(sink < nkb, sink, _BIG).expand(B, HS, NQB, n_sink)
    loc = nkb - n_local + torch.arange(n_local, device=dev).view(1, 1, 1, -1)
    loc = torch.where(loc >= n_sink, loc, _BIG).expand(B, HS, NQB, n_local)
    mid = torch.where(sel >= 0, sel.long(), _BIG)
    idx = torch.cat([sink, mid, loc], -1).sort(-1).values
    cnt = (idx < _BIG).sum(-1).to(torch.int32)
    return torch.where(idx == _BIG, 0, idx).to(torch.int32), cnt


def hip_attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    block_size_q: int = 64,
    block_size_k: int = 64,
    topk: int = 32,
    n_sink: int = 1,
    n_local: int = 4,
    n_rep: int = 1,
    dense_below: int = 8192,
    return_blocks: bool = False,
    scorer=None,
    estimator: str = "rep",
    out: torch.Tensor | None = None,
    top_p: float = 0.95,
    sample_rows: int = 4,
    max_blocks: int | None = None,
):
    """HiP prefill. q: [B, T, HQ, D]; k, v: [B, S, HKV, D]. Falls back to dense flash_prefill when
    S < dense_below. Returns o [B, T, HQ, D]
    (and (block_idx, block_cnt) with return_blocks; None for the dense fallback).

    estimator "rep" / "bound": hierarchical top-`topk` selection (hip_select), a fixed budget.
    estimator "mass": adaptive budget per head and query block: the exact attention of `sample_rows`
    rows of each query block over all keys (sampled_block_mass, sample_rows/block_size_q of the QK^T
    work) gives each key block's mass; the sink and local blocks plus the fewest blocks reaching
    `top_p` of it are kept (at most `max_blocks` besides sink/local when given: caps the time, and
    then the recall)."""
    B, T, HQ, D = q.shape
    S = k.shape[1]
    nkb = triton.cdiv(S, block_size_k)
    # (when n_sink + topk + n_local >= nkb the selection keeps every block: same result as dense)
    if S < dense_below or nkb <= n_sink + n_local:
        o = flash_prefill(q, k, v, causal=causal, scale=scale, out=out)
        return (o, None) if return_blocks else o
    kend = prefill_kend(T, S, block_size_q, causal, q.device)
    if estimator == "mass":
        mass = sampled_block_mass(q, k, block_size_q, block_size_k, sample_rows, causal, scale)
        blocks = topp_block_list(mass, kend, block_size_k, top_p, n_sink, n_local, max_blocks=max_blocks)
        del mass
    else:
        sel = hip_select(q, k, kend, S, block_size_q, block_size_k, topk, n_sink, n_local, n_rep,
                         group_heads=False, scorer=scorer, estimator=estimator)
        blocks = hip_block_list(sel, kend, block_size_k, n_sink, n_local)
    o = block_sparse_attention(q, k, v, *blocks, block_size_q, block_size_k, causal=causal,
                               scale=scale, out=out)
    return (o, blocks) if return_blocks else o


@triton.jit
def hip_decode_select_fwd_kernel(
    q, k, sel, seqlens, block_table,
    n_iter, topk, n_sink, n_local, page_size,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh, stride_btb,
    T_Q: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, TOPK: tl.constexpr, N_REP: tl.constexpr, PAGED: tl.constexpr,
):
    """hip_select's iterative halving for one (sequence, KV head) in one program: the topk segments
    live in registers as [TOPK] start/end vectors (slots >= topk are kept empty), each step scores
    the 2 TOPK halves by their representative keys and keeps the topk best by rank."""
    i_bk = tl.program_id(0)
    i_b = i_bk // HKV
    i_hk = i_bk % HKV
    seqlen = tl.load(seqlens + i_b)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    row_ok = offs_r < T_Q * G
    # rows: (token r // G, head r % G) of this KV head's query heads
    qt = tl.load(q + i_b.to(tl.int64) * stride_qb + (offs_r // G)[:, None] * stride_qt
                 + (i_hk * G + offs_r % G)[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    M = tl.maximum(tl.cdiv(seqlen, BLOCK_K) - n_local - n_sink, 0)
    i = tl.arange(0, TOPK)
    slot_ok = i < topk
    s = n_sink + (M * i) // topk
    e = tl.where(slot_ok, n_sink + (M * (i + 1)) // topk, s)
    c = tl.arange(0, 2 * TOPK)
    for _ in range(n_iter):
        half = s + (e - s + 1) // 2
        cs = tl.reshape(tl.join(s, half), [2 * TOPK])
        ce = tl.reshape(tl.join(half, e), [2 * TOPK])
        score = tl.full([2 * TOPK], float("-inf"), dtype=tl.float32)
        for r in tl.static_range(N_REP):
            # n_rep keys spread evenly over each half
            pos = cs * BLOCK_K + ((ce - cs) * BLOCK_K * (2 * r + 1)) // (2 * N_REP)
            ok = (ce > cs) & (pos < seqlen)
            # [2 TOPK, D]
            kk = key_rows(k, block_table, i_b, i_hk, pos, ok, offs_d, page_size, stride_kb, stride_kt, stride_kh,
                          stride_btb, PAGED)
            sc = tl.where(row_ok[:, None], tl.dot(qt, tl.trans(kk)), float("-inf"))
            score = tl.where(ok, tl.maximum(score, tl.max(sc, 0)), score)
        # rank in (score descending, index ascending) order; slot i takes the candidate of rank i
        before = (score[None, :] > score[:, None]) | ((score[None, :] == score[:, None]) & (c[None, :] < c[:, None]))
        rank = tl.sum(before.to(tl.int32), 1)
        pick = rank[None, :] == i[:, None]
        s = tl.sum(tl.where(pick, cs[None, :], 0), 1)
        e = tl.where(slot_ok, tl.sum(tl.where(pick, ce[None, :], 0), 1), s)
    # the non-empty segments' first blocks, ascending, -1 padded
    key = tl.where(e > s, s, 1 << 30)
    rank = tl.sum(((key[None, :] < key[:, None]) | ((key[None, :] == key[:, None]) & (i[None, :] < i[:, None])))
                  .to(tl.int32), 1)
    tl.store(sel + i_bk.to(tl.int64) * topk + rank, tl.where(key == 1 << 30, -1, key), mask=rank < topk)


def hip_decode_select(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    seqlens: torch.Tensor,
    max_seqlen: int,
    block_size_k: int = 64,
    topk: int = 32,
    n_sink: int = 1,
    n_local: int = 4,
    n_rep: int = 1,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode selection, one list per (sequence, KV head) shared by its query heads and tokens: the
    same blocks as hip_select(..., group_heads=True) with one query block of all TQ tokens, in one
    launch (hip_decode_select_fwd_kernel). q: [B, TQ, HQ, D]; cache as in flash_decode.
    Returns sel [B, HKV, topk] int32 for hip_decode."""
    B, TQ, HQ, D = q.shape
    HKV = k_cache.shape[2]
    G = check_gqa(HQ, HKV)
    check_last_dim_contiguous(q, k_cache)
    sel = torch.empty(B, HKV, topk, device=q.device, dtype=torch.int32)
    if B == 0 or topk == 0:
        return sel
    # as hip_select: enough halvings for the longest sequence's segments to reach single blocks
    m_max = max(0, triton.cdiv(max_seqlen, block_size_k) - n_local - n_sink)
    l_max = triton.cdiv(m_max, topk)
    n_iter = (l_max - 1).bit_length() if l_max > 1 else 0
    paged = block_table is not None
    seqlens = seqlens.to(torch.int32)
    block_r = max(16, next_pow2(TQ * G))
    hip_decode_select_fwd_kernel[(B * HKV,)](
        q, k_cache, sel, seqlens, block_table.to(torch.int32) if paged else seqlens,
        n_iter, topk, n_sink, n_local, k_cache.shape[1] if paged else 1,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0) if paged else 0,
        T_Q=TQ, G=G, HKV=HKV, D=D, BLOCK_R=block_r, BLOCK_K=block_size_k, TOPK=max(8, next_pow2(topk)),
        N_REP=n_rep, PAGED=paged, num_warps=4 if block_r <= 64 else 8,
    )
    return sel


def hip_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sel: torch.Tensor,
    seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    block_size_k: int = 64,
    n_sink: int = 1,
    n_local: int = 4,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """HiP decode step: sparse flash-decoding over the sink blocks, the selection sel [B, HKV, K]
    (made by hip_decode_select, possibly some steps ago) and the last n_local blocks, which follow
    the cache as it grows. Returns o [B, TQ, HQ, D]."""
    return sparse_decode(q, k_cache, v_cache, sel, n_sink, n_local, block_size_k, seqlens=seqlens,
                         block_table=block_table, scale=scale, num_splits=num_splits, out=out)
