"""The SDPA baseline, FLOP counts and inputs (per-layer caches, block lists of a given density) that the kernel
benches share."""

from __future__ import annotations

import torch

from retrogram.kernels.hip_attention import prefill_kend


def sdpa_flash(q, k, v, causal):
    """PyTorch SDPA held to its flash backend (plain SDPA on a CPU); q, k, v: [B, H, T, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not q.is_cuda:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def prefill_flops(T, H, D, causal=True):
    return 4 * T * T * H * D * (0.5 if causal else 1.0)


def per_layer(x, B, L):
    """The L layers' [B, ...] slices of x [L * B, ...] (one cache per layer, as a decoder has)."""
    return [x[i * B: (i + 1) * B] for i in range(L)]


def density_lists(T, H, d, n_sink=1, n_local=4, dev="cuda", block_size_q=64, block_size_k=64):
    """Block lists keeping a fraction d of each query block's visible key blocks (random ones, plus
    sink/local): [1, H, NQB, MAXK] int32 indices and [1, H, NQB] counts."""
    nqb, nkb = -(-T // block_size_q), -(-T // block_size_k)
    kend = prefill_kend(T, T, block_size_q, True, dev)
    nvis = (kend + block_size_k - 1) // block_size_k
    r = torch.rand(1, H, nqb, nkb, device=dev)
    kb = torch.arange(nkb, device=dev)
    vis = kb[None, :] < nvis[:, None]
    mass = torch.where(vis, r, 0.0)
    # a fraction d of the visible blocks: the d * nvis largest random values
    n = torch.clamp((d * nvis.float()).round().long(), min=1)
    srt = mass.sort(-1, descending=True).values
    thr = srt.gather(-1, (n - 1).view(1, 1, -1, 1).expand(1, H, nqb, 1))
    keep = (mass >= thr) & vis
    keep |= vis & ((kb < n_sink) | (kb >= nvis[:, None] - n_local))
    cnt = keep.sum(-1).to(torch.int32)
    idx = torch.where(keep, kb, 1 << 30).sort(-1).values[..., : int(cnt.max())]
    return torch.where(idx >= 1 << 30, 0, idx).to(torch.int32), cnt
