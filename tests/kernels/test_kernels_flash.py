"""flash_prefill and flash_decode against float64 references (CPU: Triton interpreter, float32)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

import pytest  # noqa: E402
import torch  # noqa: E402

from retrogram.kernels.flash_decode import flash_decode, flash_decode_naive, sparse_decode  # noqa: E402
from retrogram.kernels.flash_prefill import flash_prefill, flash_prefill_naive  # noqa: E402

from retrogram.kernels.testing import DEV, DTYPE, TOL, poisoned, rel, rnd, to_paged  # noqa: E402,F401


@pytest.mark.parametrize("B,T,S,HQ,HKV,D,causal", [
    (1, 1, 1, 1, 1, 16, True),      # one token
    (2, 37, 37, 4, 2, 32, True),    # lengths not multiples of the block, GQA 2
    (1, 50, 70, 3, 1, 64, True),    # chunk appended to a cache (bottom-right causal), GQA 3
    (1, 70, 50, 2, 2, 16, True),    # more queries than keys: first rows see nothing
    (2, 33, 45, 4, 1, 32, False),   # non-causal, GQA 4
    (1, 40, 40, 2, 2, 128, True),
    (1, 20, 24, 2, 1, 256, True),
])
@pytest.mark.parametrize("tma", [False, True])  # K/V tiles by pointers or by tensor descriptors
def test_flash_prefill_matches_reference(B, T, S, HQ, HKV, D, causal, tma):
    q, k, v = rnd(B, T, HQ, D), rnd(B, S, HKV, D), rnd(B, S, HKV, D)
    out = poisoned(q)
    o, lse = flash_prefill(q, k, v, causal=causal, out=out, return_lse=True, tma=tma)
    ref, ref_lse = flash_prefill_naive(q.double(), k.double(), v.double(), causal=causal)
    assert o is out
    assert rel(o, ref) < TOL
    # rows that see no key: lse -inf in both, output 0
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse[fin].double(), ref_lse[fin], atol=1e-4)


@pytest.mark.parametrize("tma", [False, True])
def test_flash_prefill_strided_hf_layout_and_scale(tma):
    # HF hands [B, H, T, D]; the kernel reads the transposed view without a copy
    qh, kh, vh = rnd(2, 4, 29, 32), rnd(2, 2, 29, 32), rnd(2, 2, 29, 32)
    q, k, v = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
    assert not q.is_contiguous()
    o = flash_prefill(q, k, v, causal=True, scale=0.3, out=poisoned(q.contiguous()), tma=tma)
    ref, _ = flash_prefill_naive(q.double(), k.double(), v.double(), causal=True, scale=0.3)
    assert rel(o, ref) < TOL


@pytest.mark.parametrize("causal,tma", [(True, False), (False, False), (True, True)])
def test_flash_prefill_varlen(causal, tma):
    # sequences of 5, 35, 0 (empty) and 36 queries; keys longer than queries (cached prefix)
    cu_q = torch.tensor([0, 5, 40, 40, 76], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 9, 44, 47, 90], dtype=torch.int32, device=DEV)
    q, k, v = rnd(1, 76, 4, 32), rnd(1, 90, 2, 32), rnd(1, 90, 2, 32)
    o, lse = flash_prefill(q, k, v, causal=causal, cu_seqlens=cu_q, cu_seqlens_k=cu_k, out=poisoned(q),
                           return_lse=True, tma=tma)
    ref, ref_lse = flash_prefill_naive(q.double(), k.double(), v.double(), causal, cu_seqlens=cu_q, cu_seqlens_k=cu_k)
    assert rel(o, ref) < TOL
    assert torch.allclose(lse.double(), ref_lse, atol=1e-4)


def test_flash_prefill_rejects_bad_shapes():
    with pytest.raises(ValueError, match="head dim"):
        flash_prefill(rnd(1, 4, 2, 48), rnd(1, 4, 2, 48), rnd(1, 4, 2, 48))
    with pytest.raises(ValueError, match="multiple"):
        flash_prefill(rnd(1, 4, 3, 32), rnd(1, 4, 2, 32), rnd(1, 4, 2, 32))


@pytest.mark.parametrize("B,TQ,HQ,HKV,D,S,splits", [
    (2, 1, 4, 2, 32, 100, None),
    (1, 3, 6, 2, 64, 77, 3),     # a few query tokens, causal among themselves; GQA 3
    (3, 1, 4, 4, 16, 40, 1),     # one split: no combine across splits
    (2, 2, 8, 2, 128, 150, 64),  # more splits than blocks: empty splits
    (2, 2, 8, 2, 128, 400, 40),  # 25 splits: more than one combine tile (16 splits of 8 rows x 128)
])
def test_flash_decode_contiguous_and_paged(B, TQ, HQ, HKV, D, S, splits):
    q, k, v = rnd(B, TQ, HQ, D), rnd(B, S, HKV, D), rnd(B, S, HKV, D)
    seqlens = torch.randint(TQ, S + 1, (B,), dtype=torch.int32, device=DEV)
    seqlens[0] = TQ  # shortest possible cache
    seqlens[-1] = S if B > 1 else TQ  # and the longest
    ref = flash_decode_naive(q.double(), k.double(), v.double(), seqlens)
    o = flash_decode(q, k, v, seqlens=seqlens, num_splits=splits, out=poisoned(q))
    assert rel(o, ref) < TOL
    # NaN-filled pad in the pages: reading past seqlen would poison the result
    kp, vp, table = to_paged(k, v, 32)
    o = flash_decode(q, kp, vp, seqlens=seqlens, block_table=table, num_splits=splits, out=poisoned(q))
    assert rel(o, ref) < TOL


def test_flash_decode_hf_cache_layout():
    # DynamicCache keeps [B, HKV, S, D]; decode reads its transposed view
    q = rnd(2, 4, 1, 32).transpose(1, 2)
    kc, vc = rnd(2, 2, 57, 32), rnd(2, 2, 57, 32)
    o = flash_decode(q, kc.transpose(1, 2), vc.transpose(1, 2), out=poisoned(q.contiguous()))
    ref = flash_decode_naive(q.double(), kc.transpose(1, 2).double(), vc.transpose(1, 2).double())
    assert rel(o, ref) < TOL


def test_sparse_decode_matches_reference():
    B, HQ, HKV, D, S, bn = 2, 6, 2, 32, 200, 16
    q, k, v = rnd(B, 1, HQ, D), rnd(B, S, HKV, D), rnd(B, S, HKV, D)
    seqlens = torch.tensor([200, 131], dtype=torch.int32, device=DEV)
    # selections with padding (-1), a sink duplicate (0), a local-tail duplicate and out-of-range ids
    sel = torch.tensor([[[3, 7, -1, 12], [0, 5, 11, 12]], [[2, 9, 4, -1], [6, 8, 40, 1]]], dtype=torch.int32, device=DEV)
    o = sparse_decode(q, k, v, sel, n_sink=1, n_local=2, block_n=bn, seqlens=seqlens, num_splits=2, out=poisoned(q))
    ref = flash_decode_naive(q.double(), k.double(), v.double(), seqlens, sel=sel.cpu(), n_sink=1, n_local=2, block_n=bn)
    assert rel(o, ref) < TOL
    # and it differs from dense attention: the restriction is real
    dense = flash_decode_naive(q.double(), k.double(), v.double(), seqlens)
    assert rel(o, dense) > 1e-2
