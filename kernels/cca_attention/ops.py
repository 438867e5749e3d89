"""Chunked cross-attention (RETRO CCA) over cached neighbour K/V.

The decoder's tokens are cut into chunks of `chunk_size`; chunk l attends (non-causally) to the
keys/values of its own retrieved neighbours, k[:, l] (RETRO's shift by chunk_size - 1 tokens, so that
a chunk sees the neighbours of the previous one, is the caller's business). Every (sequence, chunk)
pair is one segment of a variable-length batch, so the work runs on flash_prefill's kernel with
cu_seqlens: the neighbour K/V is read in place from the cache layout, never expanded per token.
"""

from __future__ import annotations

import torch
import triton

from ..flash_prefill.ops import flash_prefill


def cca_cu_seqlens(B: int, T: int, L: int, chunk_size: int, n_kv: int, device):
    """Segment offsets: queries (sequence b, chunk l) -> [b*T + l*C, b*T + min((l+1)*C, T)),
    keys -> [(b*L + l)*n_kv, +n_kv). Chunks starting past T get an empty query segment."""
    b = torch.arange(B, device=device).repeat_interleave(L)
    l = torch.arange(L, device=device).repeat(B)
    q_end = b * T + torch.clamp((l + 1) * chunk_size, max=T)
    q_start = torch.minimum(b * T + l * chunk_size, q_end)
    # query segments are contiguous as long as every chunk of each sequence is listed
    cu_q = torch.cat([q_start[:1], q_end]).to(torch.int32)
    cu_k = torch.arange(B * L + 1, device=device, dtype=torch.int32) * n_kv
    return cu_q, cu_k


def cca_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [B, T, HQ, D]; k, v: [B, L, N, HKV, D] with L >= cdiv(T, chunk_size) chunks of N neighbour
    tokens each (e.g. N = neighbours x 128). Returns o [B, T, HQ, D]."""
    B, T, HQ, D = q.shape
    _, L, N, HKV, _ = k.shape
    if L < triton.cdiv(T, chunk_size):
        raise ValueError(f"{L} neighbour chunks for {triton.cdiv(T, chunk_size)} query chunks")
    cu_q, cu_k = cca_cu_seqlens(B, T, L, chunk_size, N, q.device)
    # packed views: [1, B*T, HQ, D] and [1, B*L*N, HKV, D]; reshape copies only non-packable strides
    qp = q.reshape(1, B * T, HQ, D)
    kp = k.reshape(1, B * L * N, HKV, D)
    vp = v.reshape(1, B * L * N, HKV, D)
    # the kernel writes straight into `out` when it is packable ([B, T] merge into one axis)
    direct = out is not None and out.stride(0) == T * out.stride(1) and out.stride(-1) == 1
    o = flash_prefill(qp, kp, vp, causal=False, scale=scale, cu_seqlens=cu_q, cu_seqlens_k=cu_k,
                      max_seqlen_q=min(chunk_size, T), out=out.view(1, B * T, HQ, D) if direct else None)
    o = o.view(B, T, HQ, D)
    if out is not None and not direct:
        out.copy_(o)
        return out
    return out if direct else o
