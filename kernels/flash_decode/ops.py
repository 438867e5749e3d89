"""Flash-decoding: a few query tokens against a long (optionally paged) KV cache, split along the
sequence so that batch 1 still fills the GPU; in the same launch, the last split of each
(sequence, KV head) to finish (an atomic arrival counter) combines the splits.

One program handles all the query heads of one KV head (GQA: the K/V tile is read once for the
whole group) and all query tokens, packed as rows of one tile: row r -> (token r // G, head r % G).
The same kernel runs the block-sparse decode of hip_attention (SPARSE=True): the key blocks it
visits are the sink blocks, a selected list, and the local blocks at the end of the cache.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..utils import (LOG2E, check_gqa, check_head_dim, check_last_dim_contiguous, default_scale,
                     is_interpret, next_pow2)


@triton.jit
def flash_decode_fwd_kernel(
    q, k, v, o, o_part, lse_part, counter, seqlens, block_table, sel,
    qk_scale, blocks_per_split, num_splits, page_size, n_sel, n_sink, n_local,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_btb, stride_selb,
    T_Q: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    PAGED: tl.constexpr, SPARSE: tl.constexpr,
):
    i_bk = tl.program_id(0)
    i_s = tl.program_id(1)
    i_b = i_bk // HKV
    i_hk = i_bk % HKV
    seqlen = tl.load(seqlens + i_b)

    offs_r = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    offs_nb = tl.arange(0, BLOCK_N)
    t_r = offs_r // G
    h_r = i_hk * G + offs_r % G
    row_ok = offs_r < T_Q * G
    # query t sits at position seqlen - T_Q + t and sees keys up to it
    pos_r = seqlen - T_Q + t_r
    # [BLOCK_H, D]
    qt = tl.load(q + i_b.to(tl.int64) * stride_qb + t_r[:, None] * stride_qt + h_r[:, None] * stride_qh
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    nkb = tl.cdiv(seqlen, BLOCK_N)
    if SPARSE:
        n_logical = n_sink + n_sel + n_local
    else:
        n_logical = nkb
    j_start = i_s * blocks_per_split
    j_end = tl.minimum(j_start + blocks_per_split, n_logical)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
    for j in range(j_start, j_end):
        if SPARSE:
            # logical block j -> key block: sinks, then the selection, then the local tail;
            # the three ranges are kept disjoint so no block is counted twice
            js = j - n_sink
            kb_sel = tl.load(sel + i_bk.to(tl.int64) * stride_selb + js,
                             mask=(js >= 0) & (js < n_sel), other=-1)
            kb_loc = nkb - n_local + (j - n_sink - n_sel)
            kb = tl.where(j < n_sink, j, tl.where(js < n_sel, kb_sel, kb_loc))
            ok = tl.where(j < n_sink, kb < nkb,
                          tl.where(js < n_sel, (kb >= n_sink) & (kb < nkb - n_local), kb >= n_sink))
            ok = ok & (kb >= 0)
            n0 = kb * BLOCK_N
            offs_n = n0 + offs_nb
            kmask = (offs_n < seqlen) & (tl.full([BLOCK_N], 1, tl.int1) & ok)
        else:
            # j < cdiv(seqlen, BLOCK_N) here, so only the tail block is partial
            n0 = j * BLOCK_N
            offs_n = n0 + offs_nb
            ok = n0 < seqlen
            kmask = offs_n < seqlen
        if PAGED:
            page = tl.load(block_table + i_b.to(tl.int64) * stride_btb + n0 // page_size, mask=ok, other=0)
            in_page = n0 % page_size + offs_nb
            k_off = page.to(tl.int64) * stride_kb + in_page * stride_kt
            v_off = page.to(tl.int64) * stride_vb + in_page * stride_vt
        else:
            k_off = i_b.to(tl.int64) * stride_kb + offs_n.to(tl.int64) * stride_kt
            v_off = i_b.to(tl.int64) * stride_vb + offs_n.to(tl.int64) * stride_vt
        # [BLOCK_N, D]
        kk = tl.load(k + k_off[:, None] + i_hk * stride_kh + offs_d[None, :], mask=kmask[:, None], other=0.0)
        vv = tl.load(v + v_off[:, None] + i_hk * stride_vh + offs_d[None, :], mask=kmask[:, None], other=0.0)
        # [BLOCK_H, BLOCK_N]
        s = tl.dot(qt, tl.trans(kk)) * qk_scale
        s = tl.where(kmask[None, :] & (offs_n[None, :] <= pos_r[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(vv.dtype), vv, acc)
        m_i = m_new

    # partials: o normalised per split, lse in base 2 (-inf for an empty split)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    base = (i_bk * num_splits + i_s).to(tl.int64) * BLOCK_H
    # only the valid rows: the padding rows' stores would sit in the write queue before the arrival
    tl.store(o_part + (base + offs_r[:, None]) * D + offs_d[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
    tl.store(lse_part + base + offs_r, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)), mask=row_ok)

    # one launch: the last split of this (batch, KV head) to finish combines all of them. The barrier
    # puts every thread's partial stores before the (gpu-scope acq_rel) arrival on the counter.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter + i_bk, 1, sem="acq_rel")
    if arrived == num_splits - 1:
        # [BLOCK_S splits, BLOCK_R rows (the valid ones, padded to a power of 2), D] tiles
        offs_rr = tl.arange(0, BLOCK_R)
        rr_ok = offs_rr < T_Q * G
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        den = tl.zeros([BLOCK_R], dtype=tl.float32)
        out = tl.zeros([BLOCK_R, D], dtype=tl.float32)
        # not software-pipelined: its buffers would cost the main loop occupancy
        for s0 in tl.range(0, num_splits, BLOCK_S, num_stages=1):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            msk = (offs_s < num_splits)[:, None] & rr_ok[None, :]
            rows = (i_bk * num_splits + offs_s).to(tl.int64)[:, None] * BLOCK_H + offs_rr[None, :]
            # .cg: from L2, never a stale L1 line (the other splits wrote these from other SMs)
            lse = tl.load(lse_part + rows, mask=msk, other=float("-inf"), cache_modifier=".cg")
            op = tl.load(o_part + rows[:, :, None] * D + offs_d[None, None, :], mask=msk[:, :, None], other=0.0,
                         cache_modifier=".cg")
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            w = tl.math.exp2(lse - m_sub[None, :])
            alpha = tl.math.exp2(m - m_sub)
            den = den * alpha + tl.sum(w, 0)
            out = out * alpha[:, None] + tl.sum(w[:, :, None] * op, 0)
            m = m_new
        out = out / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(o + i_b.to(tl.int64) * stride_ob + (offs_rr // G)[:, None] * stride_ot
                 + (i_hk * G + offs_rr % G)[:, None] * stride_oh + offs_d[None, :],
                 out.to(o.dtype.element_ty), mask=rr_ok[:, None])
        # ready for the next launch (and CUDA graph replay)
        tl.store(counter + i_bk, 0)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Launch configurations per shape class, from the sweep in bench/kernels/attention.py (decode_sweep, H200,
# one-launch kernel; bench/results/kernels_decode_h200.json):
# (paged, GQA group > 1, batch * KV heads >= 64) -> (num_warps, num_stages, waves of programs per SM, block_n)
DECODE_CONFIGS = {
    (True, False, True): (8, 4, 4, 128),   # paged MHA batch 8 (128-token tiles)
    (True, False, False): (4, 2, 4, 64),
    (False, False, False): (4, 4, 4, 128),
    (True, True, True): (4, 4, 2, 128),
    (True, True, False): (4, 2, 2, 128),
    (False, True, False): (4, 3, 2, 64),   # GQA batch 1 32k: 38 us, 83% of copy (45 us before the wide combine)
}
_DEFAULT_DECODE_CONFIG = (4, 4, 4, 64)


def decode_config(paged: bool, G: int, n_bh: int):
    """(num_warps, num_stages, waves, block_n) for a dense decode launch of this shape class."""
    return DECODE_CONFIGS.get((bool(paged), G > 1, n_bh >= 64), _DEFAULT_DECODE_CONFIG)


# Split arrival counters per device, zero between launches (each launch's last split resets its own):
# one buffer reused by every launch, CUDA graph replays included. Launches that overlap on concurrent
# streams would share them, so decode calls are serialised on one stream. Buffers outgrown are kept
# alive because a captured graph may still point at them.
_COUNTERS: dict = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    bufs = _COUNTERS.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 1024), device=device, dtype=torch.int32))
    return bufs[-1]


def _decode_launch(q, k, v, seqlens, block_table, sel, n_sink, n_local, n_logical_max, block_n,
                   scale, num_splits, out, num_warps=None, num_stages=None, waves=None):
    B, TQ, HQ, D = q.shape
    HKV = k.shape[2]
    G = check_gqa(HQ, HKV)
    check_head_dim(D)
    check_last_dim_contiguous(q, k, v)
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if B == 0 or n_logical_max <= 0:
        out.zero_()
        return out
    BLOCK_H = max(16, next_pow2(TQ * G))
    cw, cs, cv, _ = decode_config(block_table is not None, G, B * HKV) if sel is None else _DEFAULT_DECODE_CONFIG
    num_warps = num_warps or cw
    num_stages = num_stages or cs
    waves = waves or cv
    if num_splits is None:
        # enough programs for `waves` waves over the SMs, each split keeping at least 4 key blocks
        target = waves * _num_sms(q.device)
        num_splits = max(1, min(triton.cdiv(target, B * HKV), triton.cdiv(n_logical_max, 4)))
    blocks_per_split = triton.cdiv(n_logical_max, num_splits)
    num_splits = triton.cdiv(n_logical_max, blocks_per_split)
    o_part = torch.empty(B * HKV * num_splits * BLOCK_H * D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B * HKV * num_splits * BLOCK_H, device=q.device, dtype=torch.float32)
    paged = block_table is not None
    sparse = sel is not None
    dummy = seqlens
    page_size = k.shape[1] if paged else 1
    if paged and page_size % block_n != 0:
        raise ValueError(f"page size {page_size} must be a multiple of the key block {block_n}")
    n_sel = sel.shape[-1] if sparse else 0
    sel_t = sel.reshape(B * HKV, n_sel) if sparse else dummy
    # the combine reads [BLOCK_S splits, valid rows, D] tiles, up to 16k floats: it runs in the tail of the
    # launch, on the critical path, so one wide load beats a loop of L2 round trips (GQA batch 1 at 32k on
    # the H200: 44 -> 39 us going from 8 to 32 splits per load)
    block_r = next_pow2(TQ * G)
    block_s = max(1, min(32, 16384 // (block_r * D)))
    flash_decode_fwd_kernel[(B * HKV, num_splits)](
        q, k, v, out, o_part, lse_part, _split_counters(q.device, B * HKV), seqlens,
        block_table if paged else dummy, sel_t,
        scale * LOG2E, blocks_per_split, num_splits, page_size, n_sel, n_sink, n_local,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        block_table.stride(0) if paged else 0, sel_t.stride(0) if sparse else 0,
        T_Q=TQ, G=G, HKV=HKV, D=D, BLOCK_H=BLOCK_H, BLOCK_N=block_n, BLOCK_S=block_s, BLOCK_R=block_r,
        PAGED=paged, SPARSE=sparse, num_warps=num_warps, num_stages=1 if is_interpret() else num_stages,
    )
    return out


def default_block_n(page_size: int | None = None) -> int:
    bn = 16 if is_interpret() else 64
    if page_size is not None:
        bn = min(bn, page_size)
    return bn


def flash_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    waves: int | None = None,
) -> torch.Tensor:
    """Attention of a few new query tokens over a KV cache that already holds them.

    q: [B, TQ, HQ, D] (TQ small: 1 for plain decoding; the TQ tokens are the last ones of each
    sequence and are causal among themselves).
    Contiguous cache: k_cache, v_cache [B, S, HKV, D] (any strides, head dim contiguous).
    Paged cache: k_cache, v_cache [num_pages, page_size, HKV, D] and block_table [B, max_pages]
    int32 (page ids of each sequence, in order).
    seqlens: [B] int32 valid cache length per sequence, new tokens included (default: S).
    max_seqlen: an upper bound of seqlens (avoids a device sync when given).
    num_warps / num_stages / waves (programs per SM, sets the split count) / block_n: launch
    configuration; default: DECODE_CONFIGS for the shape class (tuned on an H200).
    Returns o [B, TQ, HQ, D].
    """
    B = q.shape[0]
    D = q.shape[-1]
    scale = default_scale(D, scale)
    paged = block_table is not None
    if seqlens is None:
        if paged:
            raise ValueError("a paged cache needs seqlens")
        seqlens = torch.full((B,), k_cache.shape[1], device=q.device, dtype=torch.int32)
        max_seqlen = k_cache.shape[1]
    seqlens = seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int(seqlens.max().item()) if B > 0 else 0
    if paged:
        block_table = block_table.to(torch.int32)
    if block_n is None:
        if is_interpret():
            block_n = default_block_n(k_cache.shape[1] if paged else None)
        else:
            G = q.shape[2] // k_cache.shape[2]
            block_n = decode_config(paged, G, B * k_cache.shape[2])[3]
            if paged:
                block_n = min(block_n, k_cache.shape[1])
    return _decode_launch(q, k_cache, v_cache, seqlens, block_table, None, 0, 0,
                          triton.cdiv(max_seqlen, block_n), block_n, scale, num_splits, out,
                          num_warps=num_warps, num_stages=num_stages, waves=waves)


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sel: torch.Tensor,
    n_sink: int,
    n_local: int,
    block_n: int,
    seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse decode: keys restricted to the first n_sink blocks, the blocks listed in
    sel [B, HKV, K] int32 (-1 = none; blocks that fall into the sink or the local tail are
    skipped), and the last n_local blocks of each sequence. Blocks are block_n tokens.
    Other arguments as in flash_decode."""
    B = q.shape[0]
    scale = default_scale(q.shape[-1], scale)
    if seqlens is None:
        seqlens = torch.full((B,), k_cache.shape[1], device=q.device, dtype=torch.int32)
    seqlens = seqlens.to(torch.int32)
    if block_table is not None:
        block_table = block_table.to(torch.int32)
    sel = sel.to(torch.int32).contiguous()
    n_logical = n_sink + sel.shape[-1] + n_local
    return _decode_launch(q, k_cache, v_cache, seqlens, block_table, sel, n_sink, n_local,
                          n_logical, block_n, scale, num_splits, out)
