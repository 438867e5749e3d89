"""Dense flash-attention prefill (FlashAttention-2 forward) in Triton.

Causal or not, GQA (query heads a multiple of KV heads), head dims 16..256, fixed-length batches
([B, T, H, D], any strides with a contiguous head dim, so HF's [B, H, T, D] transposes need no copy)
or variable-length batches packed along T with `cu_seqlens` (FlashAttention's varlen convention).
Causal masks are aligned bottom-right: with T_q queries over T_k keys, query i sees keys
j <= i + T_k - T_q (a prefill chunk appended to a KV cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import (LOG2E, check_gqa, check_head_dim, check_last_dim_contiguous, default_scale,
                     is_interpret, tma_ok)


@triton.jit
def attn_block_step(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_n, offs_d,
                    offs_qpos, T_k, qk_scale, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    TMA: tl.constexpr = False, n0=0):
    """One key block of the online softmax. Scores are kept in base-2 units (scaled by log2 e).

    offs_qpos: [BLOCK_M] position of each query on the key axis (causal: key j visible iff j <= pos).
    MASK=False is the fast path for blocks fully inside the sequence and below the diagonal.
    TMA=True: k_base / v_base are [T_k, D] tensor descriptors and the block starts at key n0 (rows past
    T_k come back as zeros).
    """
    kmask = offs_n < T_k
    if TMA:
        kt = tl.trans(k_base.load([n0, 0]))
    elif MASK:
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kmask[None, :], other=0.0)
    else:
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None])
    # [BLOCK_M, BLOCK_N], unscaled: scaling and the shift by the max are then one FMA per score
    s = tl.dot(q, kt)
    if MASK:
        valid = kmask[None, :]
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_qpos[:, None])
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASK:
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead to avoid NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(s * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = v_base.load([n0, 0])
    elif MASK:
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kmask[:, None], other=0.0)
    else:
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :])
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


def _configs():
    if is_interpret():
        # small tiles so that CPU tests cover several blocks, partial blocks and the diagonal
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    ]


def _prune(configs, named_args, **kwargs):
    d = named_args.get("D", kwargs.get("D"))
    if d is None or d <= 128:
        return [c for c in configs if c.kwargs["BLOCK_N"] >= 64] or configs
    # D=256: a 128-row tile of Q plus 64-row K/V tiles exceeds registers/shared memory
    return [c for c in configs if c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64] or configs


@triton.autotune(configs=_configs(), key=["D", "G", "IS_CAUSAL", "IS_VARLEN", "USE_TMA"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def flash_prefill_fwd_kernel(
    q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k,
    T_q, T_k, qk_scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_LSE: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_h = i_bh % HQ
    i_hk = i_h // G
    if IS_CAUSAL:
        # heaviest query blocks (most keys) first: better tail balance across the SMs
        i_m = tl.num_programs(0) - 1 - i_m
    if IS_VARLEN:
        T_total = T_q  # the packed length; lse is [HQ, T_total]
        bos_q = tl.load(cu_seqlens_q + i_b).to(tl.int64)
        T_q = (tl.load(cu_seqlens_q + i_b + 1) - bos_q).to(tl.int32)
        bos_k = tl.load(cu_seqlens_k + i_b).to(tl.int64)
        T_k = (tl.load(cu_seqlens_k + i_b + 1) - bos_k).to(tl.int32)
        off_q = bos_q * stride_qt
        off_k = bos_k * stride_kt
        off_v = bos_k * stride_vt
        off_o = bos_q * stride_ot
        lse_base = lse + i_h.to(tl.int64) * T_total + bos_q
    else:
        off_q = i_b.to(tl.int64) * stride_qb
        off_k = i_b.to(tl.int64) * stride_kb
        off_v = i_b.to(tl.int64) * stride_vb
        off_o = i_b.to(tl.int64) * stride_ob
        lse_base = lse + i_bh.to(tl.int64) * T_q
    m0 = i_m * BLOCK_M
    if m0 >= T_q:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_nb = tl.arange(0, BLOCK_N)
    delta = T_k - T_q
    # [BLOCK_M, D]
    q_ptrs = q + off_q + i_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    qb = tl.load(q_ptrs, mask=(offs_m < T_q)[:, None], other=0.0)
    k_base = k + off_k + i_hk * stride_kh
    v_base = v + off_v + i_hk * stride_vh
    if USE_TMA:
        # [T_k, D] of this sequence and KV head: bulk tensor copies, rows past T_k read as zeros
        k_base = tl.make_tensor_descriptor(k_base, shape=[T_k, D], strides=[stride_kt, 1], block_shape=[BLOCK_N, D])
        v_base = tl.make_tensor_descriptor(v_base, shape=[T_k, D], strides=[stride_vt, 1], block_shape=[BLOCK_N, D])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    offs_qpos = offs_m + delta

    if IS_CAUSAL:
        n_end = tl.maximum(tl.minimum(T_k, m0 + BLOCK_M + delta), 0)
        # blocks ending at or before the first query's diagonal need no mask
        n_full = tl.minimum(tl.maximum(m0 + delta + 1, 0) // BLOCK_N, T_k // BLOCK_N) * BLOCK_N
    else:
        n_end = T_k
        n_full = (T_k // BLOCK_N) * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = attn_block_step(acc, l_i, m_i, qb, k_base, v_base, stride_kt, stride_vt,
                                        n0 + offs_nb, offs_d, offs_qpos, T_k, qk_scale,
                                        MASK=False, IS_CAUSAL=IS_CAUSAL, TMA=USE_TMA, n0=n0)
    for n0 in range(n_full, n_end, BLOCK_N):
        acc, l_i, m_i = attn_block_step(acc, l_i, m_i, qb, k_base, v_base, stride_kt, stride_vt,
                                        n0 + offs_nb, offs_d, offs_qpos, T_k, qk_scale,
                                        MASK=True, IS_CAUSAL=IS_CAUSAL, TMA=USE_TMA, n0=n0)

    # rows that saw no key (causal with T_q > T_k) output 0 and lse -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = o + off_o + i_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(o.dtype.element_ty), mask=(offs_m < T_q)[:, None])
    if STORE_LSE:
        # natural-log LSE, FlashAttention's convention
        lse_val = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
        tl.store(lse_base + offs_m, lse_val, mask=offs_m < T_q)


def flash_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    tma: bool | None = None,
):
    """Flash attention forward.

    q: [B, T, HQ, D]; k, v: [B, S, HKV, D] (head dim contiguous; other strides free).
    Varlen: B == 1, sequences packed along T; cu_seqlens [N+1] int32 offsets of the queries and
    cu_seqlens_k those of the keys (default: cu_seqlens, i.e. self-attention).
    Returns o [B, T, HQ, D] (written into `out` when given) and, with return_lse,
    lse [B, HQ, T] float32 (varlen: [HQ, T_total]).
    tma: load the K/V tiles with the Hopper bulk tensor copy (default: on GPUs that have it).
    """
    B, T, HQ, D = q.shape
    S, HKV = k.shape[1], k.shape[2]
    check_head_dim(D)
    G = check_gqa(HQ, HKV)
    check_last_dim_contiguous(q, k, v)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    scale = default_scale(D, scale)
    varlen = cu_seqlens is not None
    if varlen:
        if B != 1:
            raise ValueError("varlen inputs are packed: batch size must be 1")
        if cu_seqlens_k is None:
            cu_seqlens_k = cu_seqlens
        cu_seqlens = cu_seqlens.to(torch.int32)
        cu_seqlens_k = cu_seqlens_k.to(torch.int32)
        n_seq = cu_seqlens.numel() - 1
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if n_seq > 0 else 0
        grid_b = n_seq
    else:
        max_seqlen_q = T
        grid_b = B
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((HQ, T) if varlen else (B, HQ, T), device=q.device, dtype=torch.float32) if return_lse else out
    if grid_b == 0 or max_seqlen_q == 0 or T == 0:
        return (out, lse) if return_lse else out
    dummy = cu_seqlens if varlen else torch.empty(1, device=q.device, dtype=torch.int32)

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), grid_b * HQ)

    flash_prefill_fwd_kernel[grid](
        q, k, v, out, lse, dummy, cu_seqlens_k if varlen else dummy,
        T, S, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        HQ=HQ, G=G, D=D, IS_CAUSAL=bool(causal), IS_VARLEN=varlen, STORE_LSE=bool(return_lse),
        USE_TMA=tma_ok(q.device, k, v) if tma is None else bool(tma),
    )
    return (out, lse) if return_lse else out
