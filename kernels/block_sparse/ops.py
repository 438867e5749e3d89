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
                     is_interpret, next_pow2, tma_ok)


def _configs():
    if is_interpret():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=st) for w, st in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3))]


@triton.autotune(configs=_configs(), key=["D", "G", "IS_CAUSAL", "BLOCK_M", "BLOCK_N", "USE_TMA"])
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
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    if IS_CAUSAL:
        # late query blocks have the longest lists: start them first for a shorter tail
        i_m = tl.num_programs(0) - 1 - i_m
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
    if USE_TMA:
        # the listed blocks are scattered: bulk tensor copies of [BLOCK_N, D] tiles
        k_base = tl.make_tensor_descriptor(k_base, shape=[T_k, D], strides=[stride_kt, 1], block_shape=[BLOCK_N, D])
        v_base = tl.make_tensor_descriptor(v_base, shape=[T_k, D], strides=[stride_vt, 1], block_shape=[BLOCK_N, D])
    offs_qpos = offs_m + (T_k - T_q)

    idx_base = block_idx + i_b.to(tl.int64) * stride_ib + i_hi * stride_ih + i_m * stride_iq
    cnt = tl.load(block_cnt + i_b * stride_cb + i_hi * stride_ch + i_m)
    # blocks below the first query's diagonal and inside the keys need no mask; the list is
    # ascending, so they are its first n_full entries
    if IS_CAUSAL:
        kb_full = tl.minimum(tl.maximum(m0 + T_k - T_q + 1, 0) // BLOCK_N, T_k // BLOCK_N)
    else:
        kb_full = T_k // BLOCK_N
    n_full = tl.zeros([], dtype=tl.int32)
    for j0 in range(0, cnt, 128):
        offs_j = j0 + tl.arange(0, 128)
        e = tl.load(idx_base + offs_j, mask=offs_j < cnt, other=kb_full)
        n_full += tl.sum((e < kb_full).to(tl.int32), 0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for j in range(0, n_full):
        kb = tl.load(idx_base + j)
        acc, l_i, m_i = attn_block_step(acc, l_i, m_i, qb, k_base, v_base, stride_kt, stride_vt,
                                        kb * BLOCK_N + offs_nb, offs_d, offs_qpos, T_k, qk_scale,
                                        MASK=False, IS_CAUSAL=IS_CAUSAL, TMA=USE_TMA, n0=kb * BLOCK_N)
    for j in range(n_full, cnt):
        kb = tl.load(idx_base + j)
        acc, l_i, m_i = attn_block_step(acc, l_i, m_i, qb, k_base, v_base, stride_kt, stride_vt,
                                        kb * BLOCK_N + offs_nb, offs_d, offs_qpos, T_k, qk_scale,
                                        MASK=True, IS_CAUSAL=IS_CAUSAL, TMA=USE_TMA, n0=kb * BLOCK_N)
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
    tma: bool | None = None,
) -> torch.Tensor:
    """q: [B, T, HQ, D]; k, v: [B, S, HKV, D]; block_idx [B, HI, cdiv(T, block_size_q), MAXK] int32
    (key blocks of block_size_k tokens, ascending, the first block_cnt[b, hi, qb] valid), HI = HQ or
    HKV. Causal masking (bottom-right aligned) applies inside the listed blocks. Returns [B, T, HQ, D].
    tma: load the K/V tiles with the Hopper bulk tensor copy (default: on GPUs that have it)."""
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
    if block_idx.stride(-1) != 1:
        block_idx = block_idx.contiguous()
    block_cnt = block_cnt.to(torch.int32).contiguous()
    scale = default_scale(D, scale)
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if T == 0 or B == 0:
        return out
    use_tma = tma_ok(q.device, k, v) if tma is None else bool(tma)
    block_sparse_fwd_kernel[(triton.cdiv(T, block_size_q), B * HQ)](
        q, k, v, out, block_idx, block_cnt, T, S, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        block_cnt.stride(0), block_cnt.stride(1),
        HQ=HQ, G=G, IDX_G=HQ // HI, D=D, IS_CAUSAL=bool(causal),
        BLOCK_M=block_size_q, BLOCK_N=block_size_k, USE_TMA=use_tma,
    )
    return out


# ----------------------------------------------------------------------------------------------
# Adaptive block selection from sampled query rows (per head and query block, top-p of the mass)
@triton.jit
def _mass_tile(q_rows, k_base, stride_kt, it, offs_n, offs_s, offs_d, pos, T_k, NKB, qk_scale, m_i, l_i, blk_base,
               N_ROWS, row_ok, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, KPT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile `it` of KPT key blocks for the sampled rows: each block's base-2 log-sum-exp per row (stored)
    and the running row log-sum-exp (m_i, l_i). Scores stay unscaled until the max is known, so scaling
    and the shift are one FMA per score."""
    offs_k = it * (KPT * BLOCK_N) + offs_n
    if MASK:
        kk = tl.load(k_base + offs_k[:, None] * stride_kt + offs_d[None, :], mask=(offs_k < T_k)[:, None], other=0.0)
    else:
        kk = tl.load(k_base + offs_k[:, None] * stride_kt + offs_d[None, :])
    s = tl.dot(q_rows, tl.trans(kk))  # [BLOCK_M, KPT * BLOCK_N]
    if MASK:
        ok = (offs_k < T_k)[None, :]
        if IS_CAUSAL:
            ok = ok & (offs_k[None, :] <= pos[:, None])
        s = tl.where(ok, s, float("-inf"))
    # [BLOCK_M, KPT] per key block; a block no row sees gets m = -inf, l = 0, blk = -inf
    s3 = tl.reshape(s, [BLOCK_M, KPT, BLOCK_N])
    m_b = tl.max(s3, 2) * qk_scale
    if MASK:
        m_bs = tl.where(m_b == float("-inf"), 0.0, m_b)
    else:
        m_bs = m_b
    l_b = tl.sum(tl.math.exp2(s3 * qk_scale - m_bs[:, :, None]), 2)
    if MASK:
        blk = tl.where(l_b > 0.0, m_bs + tl.math.log2(tl.where(l_b > 0.0, l_b, 1.0)), float("-inf"))
    else:
        blk = m_bs + tl.math.log2(l_b)
    kbs = it * KPT + offs_s
    tl.store(blk_base[:, None] + kbs[None, :] * N_ROWS, blk, mask=row_ok[:, None] & (kbs < NKB)[None, :])
    m_t = tl.max(m_b, 1)
    m_ts = tl.where(m_t == float("-inf"), 0.0, m_t)
    l_t = tl.sum(l_b * tl.math.exp2(m_bs - m_ts[:, None]), 1)
    m_new = tl.maximum(m_i, m_t)
    m_ns = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.math.exp2(m_i - m_ns) + l_t * tl.math.exp2(m_ts - m_ns)
    return m_new, l_i


_MASS_MAX_M = 128  # the largest BLOCK_M of the configs below: the scratch's rows are padded to it


def _mass_configs():
    if is_interpret():
        return [triton.Config({"BLOCK_M": 16, "KPT": kpt}, num_warps=4, num_stages=1) for kpt in (2, 1)]
    # KPT key blocks per tile: two 64-key blocks per tile were 10% faster at 128k on the H200
    return [triton.Config({"BLOCK_M": m, "KPT": kpt}, num_warps=w, num_stages=st)
            for m, kpt, w, st in ((64, 2, 4, 3), (64, 1, 4, 3), (64, 1, 4, 4), (128, 2, 8, 2), (128, 1, 8, 3))]


def _mass_prune(configs, named_args, **kwargs):
    r = named_args.get("R", kwargs.get("R"))
    bn = named_args.get("BLOCK_N", kwargs.get("BLOCK_N"))
    ok = [c for c in configs if c.kwargs["BLOCK_M"] >= r and c.kwargs["KPT"] * bn <= 128]
    return ok[:1] if is_interpret() else ok


@triton.autotune(configs=_mass_configs(), key=["D", "G", "R", "BLOCK_Q", "BLOCK_N", "IS_CAUSAL"],
                 prune_configs_by={"early_config_prune": _mass_prune})
@triton.jit
def block_mass_fwd_kernel(
    q, k, blk, mass,
    T_q, T_k, NQB, NKB, N_ROWS, qk_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    KPT: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Attention mass per (query block, key block) from the exact attention of R sampled rows of
    each query block over every key block.

    A program takes BLOCK_M // R query blocks of one query head (BLOCK_M rows, so each key tile read
    serves them all) and reads keys in tiles of KPT key blocks; row r is query block qb0 + r // R, token
    qb * BLOCK_Q + BLOCK_Q - 1 - (r % R) * (BLOCK_Q // R) (clamped to the last token). Pass 1 writes the
    base-2 log-sum-exp of every key block and row to the scratch blk [B * HQ, NKB, N_ROWS] (a key
    block's rows contiguous: coalesced stores) while accumulating each row's total; pass 2 reads them
    back and writes mass[b, h, qb, kb] = mean over the rows of 2^(blk - row total) (0 where no key
    of the block is visible)."""
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1)
    if IS_CAUSAL:
        i_p = tl.num_programs(0) - 1 - i_p  # the programs with the most keys first
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_hk = i_h // G
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    TILE: tl.constexpr = KPT * BLOCK_N
    offs_n = tl.arange(0, TILE)
    offs_s = tl.arange(0, KPT)
    qb = i_p * (BLOCK_M // R) + offs_r // R
    t = qb * BLOCK_Q + BLOCK_Q - 1 - (offs_r % R) * (BLOCK_Q // R)
    t = tl.minimum(t, T_q - 1)
    row_ok = qb < NQB
    q_rows = tl.load(q + i_b.to(tl.int64) * stride_qb + i_h * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
    pos = t + (T_k - T_q)
    k_base = k + i_b.to(tl.int64) * stride_kb + i_hk * stride_kh
    blk_base = blk + i_bh.to(tl.int64) * NKB * N_ROWS + i_p * BLOCK_M + offs_r
    if IS_CAUSAL:
        last = tl.minimum(tl.max(tl.where(row_ok, pos, 0), 0) + 1, T_k)
        # tiles every row sees whole: no mask
        first = tl.min(tl.where(row_ok, pos, T_k), 0)
        n_full = tl.minimum(tl.maximum(first + 1, 0) // TILE, T_k // TILE)
    else:
        last = T_k
        n_full = T_k // TILE
    n_blk = tl.cdiv(last, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for it in range(0, n_full):
        m_i, l_i = _mass_tile(q_rows, k_base, stride_kt, it, offs_n, offs_s, offs_d, pos, T_k, NKB, qk_scale, m_i, l_i,
                              blk_base, N_ROWS, row_ok, MASK=False, IS_CAUSAL=IS_CAUSAL, KPT=KPT, BLOCK_M=BLOCK_M,
                              BLOCK_N=BLOCK_N)
    for it in range(n_full, tl.cdiv(last, TILE)):
        m_i, l_i = _mass_tile(q_rows, k_base, stride_kt, it, offs_n, offs_s, offs_d, pos, T_k, NKB, qk_scale, m_i, l_i,
                              blk_base, N_ROWS, row_ok, MASK=True, IS_CAUSAL=IS_CAUSAL, KPT=KPT, BLOCK_M=BLOCK_M,
                              BLOCK_N=BLOCK_N)
    lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), 0.0)
    tl.debug_barrier()  # pass 2 reads what other threads of this program wrote
    offs_e = tl.arange(0, BLOCK_E)
    qbs = i_p * (BLOCK_M // R) + tl.arange(0, BLOCK_M // R)
    mass_rows = mass + (i_bh.to(tl.int64) * NQB + qbs[:, None]) * NKB
    for e0 in range(0, NKB, BLOCK_E):
        kbs = e0 + offs_e
        x = tl.load(blk_base[:, None] + kbs[None, :] * N_ROWS, mask=row_ok[:, None] & (kbs < n_blk)[None, :],
                    other=float("-inf"))
        p = tl.reshape(tl.math.exp2(x - lse[:, None]), [BLOCK_M // R, R, BLOCK_E])
        tl.store(mass_rows + kbs[None, :], tl.sum(p, 1) / R, mask=(qbs < NQB)[:, None] & (kbs < NKB)[None, :])


def sampled_block_mass(q, k, block_size_q=64, block_size_k=64, rows=4, causal=True, scale=None):
    """Attention mass per (query block, key block), from `rows` sampled query rows of each query
    block (exact over all keys, averaged over the rows). q: [B, T, HQ, D]; k: [B, S, HKV, D].
    Returns [B, HQ, cdiv(T, block_size_q), cdiv(S, block_size_k)] float32, each row summing to 1
    (bottom-right causal). Cost: rows / block_size_q of the dense QK^T product."""
    B, T, HQ, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    check_head_dim(D)
    G = check_gqa(HQ, HKV)
    check_last_dim_contiguous(q, k)
    max_m = 16 if is_interpret() else _MASS_MAX_M
    if block_size_q % rows or rows & (rows - 1) or rows > max_m:
        raise ValueError(f"rows ({rows}) must be a power of two dividing block_size_q ({block_size_q}), "
                         f"at most {max_m}")
    scale = default_scale(D, scale)
    nqb, nkb = triton.cdiv(T, block_size_q), triton.cdiv(S, block_size_k)
    mass = torch.empty((B, HQ, nqb, nkb), device=q.device, dtype=torch.float32)
    if not (B and T and S):
        return mass.zero_()
    n_rows = triton.cdiv(nqb * rows, _MASS_MAX_M) * _MASS_MAX_M  # fits every config's programs
    blk = torch.empty((B * HQ, nkb, n_rows), device=q.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(nqb, meta["BLOCK_M"] // rows), B * HQ)

    block_mass_fwd_kernel[grid](
        q, k, blk, mass, T, S, nqb, nkb, n_rows, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        HQ=HQ, G=G, D=D, R=rows, BLOCK_Q=block_size_q, BLOCK_N=block_size_k,
        BLOCK_E=16 if is_interpret() else 64, IS_CAUSAL=bool(causal),
    )
    return mass


@triton.jit
def topp_block_list_fwd_kernel(
    mass, nvis, hit, block_idx, block_cnt,
    H, NQB, NKB, top_p, max_blocks,
    N_SINK: tl.constexpr, N_LOCAL: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_MAX: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (batch, head, query block) row: the row's masses in registers; the top-p cut is the largest
    mass m* such that the base blocks plus all candidates of mass >= m* reach top_p, found by bisection
    on the bits of m* (non-negative floats order as their bit patterns), so no sort is needed."""
    row = tl.program_id(0).to(tl.int64)
    i_b = row // (H * NQB)
    i_q = row % NQB
    nv = tl.load(nvis + i_b * NQB + i_q)
    kb = tl.arange(0, BLOCK_K)
    vis = kb < nv
    m = tl.load(mass + row * NKB + kb, mask=vis, other=0.0)
    base = vis & ((kb < N_SINK) | (kb >= nv - N_LOCAL))
    if HAS_EXTRA:
        base = base | (tl.load(hit + row * (NKB + 1) + kb, mask=vis, other=0) != 0)
    cand = vis & ~base
    covered = tl.sum(tl.where(base, m, 0.0), 0)
    w = tl.where(cand, m, 0.0)
    bits = w.to(tl.int32, bitcast=True)
    # invariant: mass(lo) reaches top_p, mass(hi) does not (mass(u) = covered + candidates with bits >= u)
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0x7F800001, tl.int32)
    if covered >= top_p:
        lo = hi  # no candidate needed
    elif covered + tl.sum(w, 0) >= top_p:  # else all candidates (lo = 0)
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            if covered + tl.sum(tl.where(bits >= mid, w, 0.0), 0) >= top_p:
                lo = mid
            else:
                hi = mid
    if HAS_MAX:
        # at most max_blocks candidates: the max_blocks-th largest as the cut when it is higher
        lo2 = tl.full([], 0, tl.int32)
        hi2 = tl.full([], 0x7F800001, tl.int32)
        if max_blocks <= 0:
            lo2 = hi2
        elif tl.sum(cand.to(tl.int32), 0) > max_blocks:
            for _ in range(31):
                mid = lo2 + (hi2 - lo2) // 2
                if tl.sum((cand & (bits >= mid)).to(tl.int32), 0) >= max_blocks:
                    lo2 = mid
                else:
                    hi2 = mid
        lo = tl.maximum(lo, lo2)
    keep = base | (cand & (bits >= lo))
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    n = tl.sum(keep.to(tl.int32), 0)
    out = block_idx + row * NKB
    tl.store(out + slot, kb, mask=keep)
    tl.store(out + kb, tl.zeros_like(kb), mask=(kb >= n) & (kb < NKB))
    tl.store(block_cnt + row, n)


def topp_block_list(mass, kend, block_size_k, top_p=0.95, n_sink=1, n_local=2, max_blocks=None, extra_idx=None):
    """Per (head, query block): the sink and local blocks (and the blocks of extra_idx), plus the fewest
    other visible key blocks, by decreasing mass, whose mass brings the total to top_p (at most
    max_blocks of them). mass: [B, H, NQB, NKB] (rows summing to 1); kend: [NQB] or [B, NQB] keys
    visible to each query block; extra_idx: None or [B, H, NQB, E] int key blocks always kept (entries
    < 0 or not visible are ignored; duplicates allowed), e.g. a vertical-slash pattern.
    Returns block_idx [B, H, NQB, MAXK] int32 (ascending, packed, 0 after the count) and block_cnt
    [B, H, NQB]. Ties in mass at the cut are all kept (topp_block_list_naive keeps one of them)."""
    B, H, NQB, NKB = mass.shape
    if kend.dim() == 1:
        kend = kend[None].expand(B, -1)
    nvis = ((kend + block_size_k - 1) // block_size_k).to(torch.int32).contiguous()
    mass = mass.float().contiguous()
    idx = torch.empty((B, H, NQB, max(1, NKB)), device=mass.device, dtype=torch.int32)
    cnt = torch.zeros((B, H, NQB), device=mass.device, dtype=torch.int32)
    if mass.numel() == 0:
        return idx[..., :1].zero_(), cnt
    has_extra = extra_idx is not None and extra_idx.shape[-1] > 0
    hit = cnt
    if has_extra:
        # one pass of plain stores (duplicates write the same 1) instead of a per-row loop over the entries
        extra_idx = extra_idx.long()
        hit = torch.zeros((B, H, NQB, NKB + 1), device=mass.device, dtype=torch.int8)
        hit.scatter_(-1, torch.where((extra_idx >= 0) & (extra_idx < NKB), extra_idx, NKB), 1)
    block_k = next_pow2(NKB)
    topp_block_list_fwd_kernel[(B * H * NQB,)](
        mass, nvis, hit, idx, cnt, H, NQB, NKB, float(top_p),
        -1 if max_blocks is None else int(max_blocks),
        N_SINK=n_sink, N_LOCAL=n_local, HAS_EXTRA=has_extra, HAS_MAX=max_blocks is not None,
        BLOCK_K=block_k, num_warps=4 if block_k <= 2048 else (8 if block_k <= 8192 else 16),
    )
    return idx[..., : max(1, int(cnt.max().item()))], cnt
