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
