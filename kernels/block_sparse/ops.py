"""Block-sparse attention prefill: each query block attends only to the key blocks listed for it.

The core shared by hip_attention (top-k blocks from hierarchical pruning) and block_sparse_prefill
(MInference vertical-slash patterns turned into blocks). Block lists are [B, HI, NQB, MAXK] int32,
ascending, valid entries first, with a count [B, HI, NQB]; HI is the number of query heads or of KV
heads (a list shared by the query heads of a GQA group).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..flash_prefill.ops import attn_block_step
from ..utils import (LOG2E, check_gqa, check_head_dim, check_last_dim_contiguous, default_scale,
                     is_interpret)

_BIG = 1 << 30


@triton.jit
def block_sparse_fwd_kernel(
    q, k, v, o, block_idx, block_cnt,
    T_q, T_k, qk_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,
    HQ: tl.constexpr, G: tl.constexpr, IDX_G: tl.constexpr, D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_hk = i_h // G
    i_hi = i_h // IDX_G
    m0 = i_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_nb = tl.arange(0, BLOCK_N)
    qb = tl.load(q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + offs_m[:, None] * stride_qt
                 + offs_d[None, :], mask=(offs_m < T_q)[:, None], other=0.0)
    k_base = k + i_b.to(tl.int64) * stride_kb + i_hk * stride_kh
    v_base = v + i_b.to(tl.int64) * stride_vb + i_hk * stride_vh
    offs_qpos = offs_m + (T_k - T_q)

    idx_base = block_idx + i_b.to(tl.int64) * stride_ib + i_hi * stride_ih + i_m * stride_iq
    cnt = tl.load(block_cnt + i_b * stride_cb + i_hi * stride_ch + i_m)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for j in range(0, cnt):
        kb = tl.load(idx_base + j)
        # always masked: the listed blocks may straddle the diagonal or the end of the keys
        acc, l_i, m_i = attn_block_step(acc, l_i, m_i, qb, k_base, v_base, stride_kt, stride_vt,
                                        kb * BLOCK_N + offs_nb, offs_d, offs_qpos, T_k, qk_scale,
                                        MASK=True, IS_CAUSAL=IS_CAUSAL)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(o + i_b.to(tl.int64) * stride_ob + i_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(o.dtype.element_ty), mask=(offs_m < T_q)[:, None])


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    block_size_q: int,
    block_size_k: int,
    causal: bool = True,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """q: [B, T, HQ, D]; k, v: [B, S, HKV, D]; block_idx [B, HI, cdiv(T, block_size_q), MAXK] int32
    (key blocks of block_size_k tokens, ascending, the first block_cnt[b, hi, qb] valid), HI = HQ or
    HKV. Causal masking (bottom-right aligned) applies inside the listed blocks. Returns [B, T, HQ, D]."""
    B, T, HQ, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    check_head_dim(D)
    G = check_gqa(HQ, HKV)
    check_last_dim_contiguous(q, k, v)
    HI = block_idx.shape[1]
    if HI not in (HQ, HKV):
        raise ValueError(f"block lists have {HI} heads; expected {HQ} (query) or {HKV} (KV)")
    if block_idx.shape[2] != triton.cdiv(T, block_size_q):
        raise ValueError(f"block lists cover {block_idx.shape[2]} query blocks, need {triton.cdiv(T, block_size_q)}")
    block_idx = block_idx.to(torch.int32)
    block_cnt = block_cnt.to(torch.int32).contiguous()
    scale = default_scale(D, scale)
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if T == 0 or B == 0:
        return out
    if num_warps is None:
        num_warps = 4 if block_size_q <= 64 else 8
    if num_stages is None:
        num_stages = 1 if is_interpret() else (2 if D >= 256 else 3)
    block_sparse_fwd_kernel[(triton.cdiv(T, block_size_q), B * HQ)](
        q, k, v, out, block_idx, block_cnt, T, S, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        block_cnt.stride(0), block_cnt.stride(1),
        HQ=HQ, G=G, IDX_G=HQ // HI, D=D, IS_CAUSAL=bool(causal),
        BLOCK_M=block_size_q, BLOCK_N=block_size_k, num_warps=num_warps, num_stages=num_stages,
    )
    return out


# ----------------------------------------------------------------------------------------------
# Adaptive block selection from sampled query rows (per head and query block, top-p of the mass)
@triton.jit
def block_mass_fwd_kernel(
    q, k, blk_lse, row_lse,
    T_q, T_k, NQB, NKB, qk_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, QB_PER_PROG: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Exact attention of R sampled rows of each query block over every key block.

    A program takes QB_PER_PROG query blocks of one query head (BLOCK_M = QB_PER_PROG * R rows, so each
    key tile read serves them all); row r is query block qb0 + r // R, token
    qb * BLOCK_Q + BLOCK_Q - 1 - (r % R) * (BLOCK_Q // R) (clamped to the last token). Writes, in base 2,
    blk_lse[b, h, qb * R + i, kb] = log2 sum_{keys of block kb} 2^(s * log2 e) (-inf where no key is
    visible) and row_lse[b, h, qb * R + i] = the same over all keys."""
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_hk = i_h // G
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    qb = i_p * QB_PER_PROG + offs_r // R
    t = qb * BLOCK_Q + BLOCK_Q - 1 - (offs_r % R) * (BLOCK_Q // R)
    t = tl.minimum(t, T_q - 1)
    row_ok = qb < NQB
    qt = tl.load(q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    pos = t + (T_k - T_q)
    k_base = k + i_b.to(tl.int64) * stride_kb + i_hk * stride_kh
    out_rows = (i_bh.to(tl.int64) * NQB * R + i_p * BLOCK_M + offs_r)
    if IS_CAUSAL:
        last = tl.minimum(tl.max(tl.where(row_ok, pos, 0), 0) + 1, T_k)
    else:
        last = T_k
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for kb in range(0, tl.cdiv(last, BLOCK_N)):
        offs_k = kb * BLOCK_N + offs_n
        kk = tl.load(k_base + offs_k[:, None] * stride_kt + offs_d[None, :], mask=(offs_k < T_k)[:, None], other=0.0)
        s = tl.dot(qt, tl.trans(kk)) * qk_scale
        ok = (offs_k < T_k)[None, :]
        if IS_CAUSAL:
            ok = ok & (offs_k[None, :] <= pos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_t = tl.max(s, 1)
        m_ts = tl.where(m_t == float("-inf"), 0.0, m_t)
        l_t = tl.sum(tl.math.exp2(s - m_ts[:, None]), 1)
        blk = tl.where(l_t > 0.0, m_ts + tl.math.log2(tl.where(l_t > 0.0, l_t, 1.0)), float("-inf"))
        tl.store(blk_lse + out_rows * NKB + kb, blk, mask=row_ok)
        m_new = tl.maximum(m_i, m_t)
        m_ns = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_ns) + l_t * tl.math.exp2(m_ts - m_ns)
        m_i = m_new
    lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    tl.store(row_lse + out_rows, lse, mask=row_ok)


def sampled_block_mass(q, k, block_size_q=64, block_size_k=64, rows=4, causal=True, scale=None,
                       qb_per_prog=None):
    """Attention mass per (query block, key block), from `rows` sampled query rows of each query
    block (exact over all keys, averaged over the rows). q: [B, T, HQ, D]; k: [B, S, HKV, D].
    Returns [B, HQ, cdiv(T, block_size_q), cdiv(S, block_size_k)] float32, each row summing to 1
    (bottom-right causal). Cost: rows / block_size_q of the dense QK^T product."""
    B, T, HQ, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    check_head_dim(D)
    G = check_gqa(HQ, HKV)
    check_last_dim_contiguous(q, k)
    if block_size_q % rows:
        raise ValueError(f"rows ({rows}) must divide block_size_q ({block_size_q})")
    scale = default_scale(D, scale)
    nqb, nkb = triton.cdiv(T, block_size_q), triton.cdiv(S, block_size_k)
    if qb_per_prog is None:
        qb_per_prog = max(1, (16 if is_interpret() else 64) // rows)
    block_m = max(16, qb_per_prog * rows)
    qb_per_prog = block_m // rows
    n_prog = triton.cdiv(nqb, qb_per_prog)
    blk = torch.full((B, HQ, n_prog * qb_per_prog * rows, nkb), float("-inf"), device=q.device, dtype=torch.float32)
    row = torch.full((B, HQ, n_prog * qb_per_prog * rows), float("-inf"), device=q.device, dtype=torch.float32)
    if B and T and S:
        block_mass_fwd_kernel[(n_prog, B * HQ)](
            q, k, blk, row, T, S, n_prog * qb_per_prog, nkb, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            HQ=HQ, G=G, D=D, R=rows, QB_PER_PROG=qb_per_prog, BLOCK_Q=block_size_q, BLOCK_M=block_m,
            BLOCK_N=block_size_k, IS_CAUSAL=bool(causal),
            num_warps=4, num_stages=1 if is_interpret() else 3,
        )
    blk = blk[:, :, : nqb * rows].view(B, HQ, nqb, rows, nkb)
    row = row[:, :, : nqb * rows].view(B, HQ, nqb, rows, 1)
    row = torch.where(torch.isfinite(row), row, 0.0)
    return torch.exp2(blk - row).mean(3)


def topp_block_list(mass, kend, block_size_k, top_p=0.95, n_sink=1, n_local=2, max_blocks=None, min_blocks=0,
                    extra_idx=None):
    """Per (head, query block): the sink and local blocks (and the blocks of extra_idx), plus the fewest
    other visible key blocks, by decreasing mass, whose mass brings the total to top_p (at least
    min_blocks and at most max_blocks of them). mass: [B, H, NQB, NKB] (rows summing to 1); kend: [NQB]
    or [B, NQB] keys visible to each query block; extra_idx: None or [B, H, NQB, E] int key blocks always
    kept (entries < 0 or not visible are ignored; duplicates allowed), e.g. a vertical-slash pattern.
    Returns block_idx [B, H, NQB, MAXK] int32 (ascending, packed) and block_cnt [B, H, NQB]."""
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
    n = n.clamp(min=min_blocks)
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
