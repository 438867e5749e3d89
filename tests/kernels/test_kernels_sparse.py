"""Block-sparse core, HiP attention and vertical-slash prefill against their references
(CPU: Triton interpreter, float32)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

import pytest  # noqa: E402
import torch  # noqa: E402

from retrogram.kernels.block_sparse import (block_sparse_attention, block_sparse_attention_naive,  # noqa: E402
                                            sampled_block_mass, sampled_block_mass_naive, topp_block_list,
                                            topp_block_list_naive)
from retrogram.kernels.block_sparse_prefill import (block_sparse_prefill, block_sparse_prefill_naive,  # noqa: E402
                                                    mass_vertical_slash_scores, mass_vertical_slash_scores_naive,
                                                    vertical_slash_blocks, vertical_slash_scores,
                                                    vertical_slash_scores_naive, vs_pattern)
from retrogram.kernels.flash_prefill import flash_prefill_naive  # noqa: E402
from retrogram.kernels.hip_attention import (bound_rows, bound_score_naive, bound_score_triton,  # noqa: E402
                                             key_bound_tables, hip_attention_naive, hip_attention_prefill, hip_decode,  # noqa: E402
                                             hip_decode_naive, hip_decode_select, hip_decode_select_naive,
                                             hip_select, prefill_kend,
                                             score_naive, score_triton)
from retrogram.kernels.quality import sparse_quality  # noqa: E402

from retrogram.kernels.testing import DEV, DTYPE, TOL, poisoned, rel, rnd, to_paged  # noqa: E402,F401


def random_lists(B, HI, nqb, nkb, maxk):
    """Ascending, unique key-block lists with random counts (0 included)."""
    idx = torch.rand(B, HI, nqb, nkb).argsort(-1)[..., :maxk].sort(-1).values.to(torch.int32)
    cnt = torch.randint(0, maxk + 1, (B, HI, nqb), dtype=torch.int32)
    return idx.to(DEV), cnt.to(DEV)


@pytest.mark.parametrize("B,T,S,HQ,HKV,shared,causal,bq,bk", [
    (2, 70, 90, 4, 2, False, True, 16, 16),   # per query head lists, T < S
    (1, 45, 45, 6, 2, True, True, 32, 16),    # lists shared by a GQA group; bq != bk
    (1, 33, 50, 2, 1, False, False, 16, 16),  # non-causal
])
@pytest.mark.parametrize("tma", [False, True])  # K/V tiles by pointers or by tensor descriptors
def test_block_sparse_core(B, T, S, HQ, HKV, shared, causal, bq, bk, tma):
    q, k, v = rnd(B, T, HQ, 32), rnd(B, S, HKV, 32), rnd(B, S, HKV, 32)
    idx, cnt = random_lists(B, HKV if shared else HQ, -(-T // bq), -(-S // bk), 3)
    o = block_sparse_attention(q, k, v, idx, cnt, bq, bk, causal=causal, out=poisoned(q), tma=tma)
    ref = block_sparse_attention_naive(q.double(), k.double(), v.double(), idx, cnt, bq, bk, causal=causal)
    assert rel(o, ref) < TOL
    # empty lists give zeros, as the reference does
    assert torch.all(o[:, :bq][:, :, [h for h in range(HQ)]][(cnt[:, :, 0] == 0).repeat_interleave(
        HQ // cnt.shape[1], 1)[:, None, :].expand(B, bq if T >= bq else T, HQ)] == 0)


def test_block_sparse_all_blocks_is_dense():
    T, bq, bk = 50, 16, 16
    q, k, v = rnd(1, T, 4, 32), rnd(1, T, 2, 32), rnd(1, T, 2, 32)
    nqb, nkb = -(-T // bq), -(-T // bk)
    idx = torch.arange(nkb, dtype=torch.int32, device=DEV).expand(1, 4, nqb, nkb).contiguous()
    cnt = torch.full((1, 4, nqb), nkb, dtype=torch.int32, device=DEV)
    o = block_sparse_attention(q, k, v, idx, cnt, bq, bk, out=poisoned(q))
    ref, _ = flash_prefill_naive(q.double(), k.double(), v.double(), causal=True)
    assert rel(o, ref) < TOL


@pytest.mark.parametrize("group_heads,paged", [(False, False), (True, False), (True, True)])
def test_hip_score_kernel(group_heads, paged):
    B, T, S, HQ, HKV, bq = 2, 40, 96, 6, 2, 16
    q, k = rnd(B, T, HQ, 32), rnd(B, S, HKV, 32)
    table = None
    if paged:
        table = torch.randperm(B * 3, device=DEV).view(B, 3).to(torch.int32)
        kp = torch.empty(B * 3, 32, HKV, 32, device=DEV, dtype=DTYPE)
        kp[table.flatten().long()] = k.view(B * 3, 32, HKV, 32)
        k = kp
    HS = HKV if group_heads else HQ
    rep = torch.randint(-1, S, (B, HS, -(-T // bq), 7), device=DEV)
    rep[0, 0, 0, 0] = -1  # at least one empty slot (random draws miss -1 about 7% of the time)
    got = score_triton(q, k, rep, bq, group_heads, table)
    ref = score_naive(q, k, rep, bq, group_heads, table)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.isinf(got).any()
    fin = torch.isfinite(ref)
    assert torch.allclose(got[fin], ref[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group_heads", [False, True])
def test_hip_bound_score_kernel(group_heads):
    B, T, S, HQ, HKV, bq, bk = 2, 40, 150, 4, 2, 16, 16  # S not a multiple of the key block
    q, k = rnd(B, T, HQ, 32), rnd(B, S, HKV, 32)
    nkb = -(-S // bk)
    HS = HKV if group_heads else HQ
    cs = torch.randint(0, nkb, (B, HS, -(-T // bq), 9), device=DEV)
    ce = torch.clamp(cs + torch.randint(0, 7, cs.shape, device=DEV), max=nkb)  # some empty ranges
    tables = key_bound_tables(k, bk)
    r1, r2 = bound_rows(cs, ce, B, nkb)
    got = bound_score_triton(q, tables, r1, r2, bq, group_heads)
    ref = bound_score_naive(q, k, cs, ce, bq, bk, group_heads)
    assert torch.equal(torch.isinf(got.cpu()), torch.isinf(ref)) and torch.isinf(ref).any()
    fin = torch.isfinite(ref)
    assert torch.allclose(got.cpu()[fin], ref[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("estimator", ["rep", "bound"])
def test_hip_select_structure_and_planted_keys(estimator):
    torch.manual_seed(1)
    B, T, HQ, HKV, D, bq, bk, topk = 1, 512, 2, 1, 32, 64, 16, 4
    q = rnd(B, T, HQ, D) * 0.1
    k = rnd(B, T, HKV, D) * 0.1
    direction = torch.randn(D, device=DEV)
    q += direction
    # "bound": one spiking key inside blocks 5 and 13 must be found (the bound sees every key);
    # "rep": reads one key per segment, so only smooth structure is guaranteed: plant whole
    # 4-block regions and require planted blocks to be found
    if estimator == "bound":
        for blk in (5, 13):
            k[0, blk * bk + 7, 0] = 4 * direction
        regions = [[5], [13]]
    else:
        for blk in (4, 12):
            k[0, blk * bk : (blk + 4) * bk, 0] += 2 * direction
        regions = [[4, 5, 6, 7, 12, 13, 14, 15]]  # top-4 may all fall in one region
    kend = prefill_kend(T, T, bq, True, DEV)
    sel = hip_select(q, k, kend, T, bq, bk, topk, n_sink=1, n_local=2, estimator=estimator)
    assert sel.shape == (B, HQ, T // bq, topk)
    nkb = (kend + bk - 1) // bk
    for h in range(HQ):
        for qb in range(T // bq):
            row = sel[0, h, qb]
            valid = row[row >= 0]
            middle = int(nkb[qb]) - 2 - 1
            assert valid.numel() == min(topk, max(middle, 0))
            assert torch.all(valid[1:] > valid[:-1])  # ascending, unique
            assert torch.all((valid >= 1) & (valid < nkb[qb] - 2))
            for reg in regions:
                if reg[0] + (estimator == "rep") * 3 < nkb[qb] - 2:
                    assert set(reg) & set(valid.tolist()), (h, qb, valid.tolist())


@pytest.mark.parametrize("T,S,HQ,HKV", [(300, 300, 4, 2), (200, 260, 2, 2)])
def test_hip_prefill_matches_reference(T, S, HQ, HKV):
    q, k, v = rnd(1, T, HQ, 32), rnd(1, S, HKV, 32), rnd(1, S, HKV, 32)
    o, (bi, bc) = hip_attention_prefill(q, k, v, block_size_q=32, block_size_k=16, topk=3, n_sink=1, n_local=2,
                                        dense_below=0, return_blocks=True, out=poisoned(q))
    assert int(bc.max()) <= 1 + 3 + 2
    ref = hip_attention_naive(q.double(), k.double(), v.double(), bi, bc, 32, 16)
    assert rel(o, ref) < TOL
    dense, _ = flash_prefill_naive(q.double(), k.double(), v.double())
    assert rel(o, dense) > 1e-2  # sparse for real


def test_block_sparse_long_lists():
    """Lists longer than one 128-entry chunk of the count of unmasked blocks, with blocks past the
    diagonal and past the keys mixed in."""
    T, S, bq, bk = 40, 2300, 16, 16
    q, k, v = rnd(1, T, 1, 16), rnd(1, S, 1, 16), rnd(1, S, 1, 16)
    nkb = -(-S // bk)
    idx = torch.stack([torch.arange(nkb - 1), torch.arange(1, nkb), torch.arange(nkb - 1)])[None, None]
    idx = idx.to(torch.int32).to(DEV)
    cnt = torch.tensor([[[nkb - 1, nkb - 1, 70]]], dtype=torch.int32, device=DEV)
    o = block_sparse_attention(q, k, v, idx, cnt, bq, bk, out=poisoned(q))
    ref = block_sparse_attention_naive(q.double(), k.double(), v.double(), idx, cnt, bq, bk)
    assert rel(o, ref) < TOL


@pytest.mark.parametrize("B,T,S,HQ,HKV,bq,bk,rows,causal", [
    (2, 150, 170, 4, 2, 32, 16, 4, True),   # GQA, T < S, partial last blocks, bq != bk
    (1, 100, 100, 3, 1, 16, 32, 2, True),   # bk > bq
    (1, 40, 90, 2, 2, 16, 16, 8, False),    # non-causal
    (1, 130, 300, 2, 1, 32, 128, 4, True),  # 128-key blocks: one key block per tile (KPT 1; else 2)
])
def test_sampled_block_mass_kernel(B, T, S, HQ, HKV, bq, bk, rows, causal):
    q, k = rnd(B, T, HQ, 32), 2 * rnd(B, S, HKV, 32)
    m = sampled_block_mass(q, k, bq, bk, rows, causal)
    ref = sampled_block_mass_naive(q, k, bq, bk, rows, causal)
    assert not torch.isnan(m).any()
    assert (m.double().cpu() - ref).abs().max().item() < 1e-5
    assert torch.allclose(m.sum(-1).double().cpu(), torch.ones(()).double(), atol=1e-5)


def test_topp_block_list_minimal_and_covering():
    B, H, NQB, NKB, bk = 2, 3, 6, 12, 16
    mass = torch.softmax(3 * torch.randn(B, H, NQB, NKB), -1)
    kend = torch.tensor([40, 70, 100, 130, 160, 192])  # visible keys per query block
    nkb_q = (kend + bk - 1) // bk
    vis = torch.arange(NKB)[None] < nkb_q[:, None]  # [NQB, NKB]
    mass = mass * vis
    mass = mass / mass.sum(-1, keepdim=True)
    for top_p, max_blocks in ((0.9, None), (0.5, None), (0.99, 2)):
        bi, bc = topp_block_list(mass, kend, bk, top_p, n_sink=1, n_local=1, max_blocks=max_blocks)
        for b in range(B):
            for h in range(H):
                for qb in range(NQB):
                    blocks = bi[b, h, qb, : bc[b, h, qb]].tolist()
                    assert blocks == sorted(set(blocks)) and all(0 <= x < nkb_q[qb] for x in blocks)
                    base = {0, int(nkb_q[qb]) - 1}
                    assert base <= set(blocks)
                    extra = [x for x in blocks if x not in base]
                    got = mass[b, h, qb, blocks].sum().item()
                    if max_blocks is not None and len(extra) == max_blocks:
                        continue
                    assert got >= top_p - 1e-6
                    # minimal: the smallest extra block is not needed... but dropping it falls short
                    if extra:
                        smallest = min(mass[b, h, qb, x].item() for x in extra)
                        assert got - smallest < top_p + 1e-6
                    # the extra blocks are the heaviest of the rest
                    rest = [mass[b, h, qb, x].item() for x in range(int(nkb_q[qb])) if x not in blocks]
                    if extra and rest:
                        assert min(mass[b, h, qb, x].item() for x in extra) >= max(rest) - 1e-7


@pytest.mark.parametrize("NQB,NKB,n_sink,n_local,E,max_blocks,per_batch", [
    (7, 13, 1, 2, 0, None, False),
    (5, 37, 2, 1, 6, None, True),    # extra blocks (duplicates, -1, invisible ones) and per-batch kend
    (6, 20, 1, 1, 4, 3, False),      # capped
    (4, 9, 0, 0, 0, None, False),    # no sink/local blocks
])
def test_topp_block_list_matches_naive(NQB, NKB, n_sink, n_local, E, max_blocks, per_batch):
    torch.manual_seed(NKB)
    B, H, bk = 2, 3, 16
    mass = torch.softmax(3 * torch.randn(B, H, NQB, NKB), -1)
    if per_batch:
        kend = torch.randint(1, NKB * bk + 1, (B, NQB))
    else:
        kend = torch.linspace(bk // 2, NKB * bk, NQB).long()
    extra = torch.randint(-2, NKB + 2, (B, H, NQB, E)) if E else None
    for top_p in (0.3, 0.9, 0.99, 1.5):
        args = (mass.to(DEV), kend.to(DEV), bk, top_p, n_sink, n_local, max_blocks)
        ex = extra.to(DEV) if E else None
        bi, bc = topp_block_list(*args, extra_idx=ex)
        ri, rc = topp_block_list_naive(*args, extra_idx=ex)
        assert torch.equal(bc.cpu(), rc.cpu())
        assert torch.equal(bi.cpu(), ri.cpu())


@pytest.mark.parametrize("T,S,HQ,HKV", [(260, 260, 2, 1)])
def test_hip_prefill_mass_estimator(T, S, HQ, HKV):
    q, k, v = rnd(1, T, HQ, 32), 3 * rnd(1, S, HKV, 32), rnd(1, S, HKV, 32)
    o, (bi, bc) = hip_attention_prefill(q, k, v, block_size_q=16, block_size_k=16, n_sink=1, n_local=1,
                                        dense_below=0, return_blocks=True, out=poisoned(q), estimator="mass",
                                        top_p=0.8, sample_rows=4)
    ref = hip_attention_naive(q.double(), k.double(), v.double(), bi, bc, 16, 16)
    assert rel(o, ref) < TOL
    # the kept blocks hold about top_p of the real attention mass (sampled rows: an estimate)
    rec, _ = sparse_quality(q[0], k[0], v[0], bi[0], bc[0], 16, 16)
    assert rec.mean() > 0.7
    assert bc.float().mean() < -(-S // 16) / 2 + 2  # and it is sparse


def test_hip_prefill_dense_fallback():
    q, k, v = rnd(1, 40, 2, 32), rnd(1, 40, 2, 32), rnd(1, 40, 2, 32)
    o, blocks = hip_attention_prefill(q, k, v, dense_below=64, return_blocks=True, out=poisoned(q))
    assert blocks is None
    assert rel(o, flash_prefill_naive(q.double(), k.double(), v.double())[0]) < TOL


@pytest.mark.parametrize("paged", [False, True])
def test_hip_decode_matches_reference(paged):
    B, HQ, HKV, D, S, bk = 2, 4, 2, 32, 256, 16
    q, k, v = rnd(B, 1, HQ, D), rnd(B, S, HKV, D), rnd(B, S, HKV, D)
    seqlens = torch.tensor([256, 190], dtype=torch.int32, device=DEV)
    table = None
    kc, vc = k, v
    if paged:
        kc, vc, table = to_paged(k, v, 32)
    sel = hip_decode_select(q, kc, seqlens, S, block_size_k=bk, topk=3, n_sink=1, n_local=2, block_table=table)
    assert sel.shape == (B, HKV, 3)
    o = hip_decode(q, kc, vc, sel, seqlens, table, block_size_k=bk, n_sink=1, n_local=2, out=poisoned(q))
    ref = hip_decode_naive(q.double(), k.double(), v.double(), sel.cpu(), seqlens, block_size_k=bk, n_sink=1, n_local=2)
    assert rel(o, ref) < TOL


@pytest.mark.parametrize("B,TQ,HQ,HKV,S,topk,n_rep,page", [
    (2, 1, 8, 2, 300, 4, 1, None),  # GQA 4, lengths not multiples of the key block
    (2, 1, 8, 2, 300, 4, 1, 32),    # the same through a block table
    (1, 2, 4, 4, 200, 3, 2, None),  # MHA, two query tokens, two representatives, topk not a power of 2
    (3, 1, 6, 2, 260, 5, 1, 64),
])
def test_hip_decode_select_kernel(B, TQ, HQ, HKV, S, topk, n_rep, page):
    torch.manual_seed(0)
    bk, D = 16, 32
    q, k = rnd(B, TQ, HQ, D), rnd(B, S, HKV, D)
    seqlens = torch.randint(S // 2, S + 1, (B,), dtype=torch.int32, device=DEV)
    seqlens[0] = S
    if B > 1:
        seqlens[-1] = 70  # fewer middle blocks than topk: empty segments
    kc, table = k, None
    if page is not None:
        kc, _, table = to_paged(k, k, page)
    sel = hip_decode_select(q, kc, seqlens, S, block_size_k=bk, topk=topk, n_sink=1, n_local=2, n_rep=n_rep,
                            block_table=table)
    ref = hip_decode_select_naive(q, kc, seqlens, S, bk, topk, 1, 2, n_rep, table)
    assert torch.equal(sel.cpu(), ref)
    # the same blocks as the multi-launch hierarchical selection
    old = hip_select(q, kc, seqlens.long()[:, None], S, TQ, bk, topk, 1, 2, n_rep, group_heads=True, block_table=table)
    assert torch.equal(sel, old[:, :, 0])


def test_vertical_slash_scores_match_loop_reference():
    q, k = rnd(1, 50, 2, 16), rnd(1, 70, 1, 16)
    got_v, got_s = vertical_slash_scores(q, k, last_q=6, block_size_k=16)
    ref_v, ref_s = vertical_slash_scores_naive(q, k, last_q=6, block_size_k=16)
    assert rel(got_v, ref_v) < TOL and rel(got_s, ref_s) < TOL
    # each of the 6 queries spreads a mass of 1 over the keys
    assert torch.allclose(got_v.sum(-1), torch.full_like(got_v.sum(-1), 6.0), atol=1e-4)


@pytest.mark.parametrize("estimator", ["last_q", "mass"])
def test_vertical_slash_blocks_and_attention(estimator):
    torch.manual_seed(2)
    T, bq, bk = 256, 32, 16
    q, k, v = rnd(1, T, 2, 32) * 0.1, rnd(1, T, 2, 32) * 0.1, rnd(1, T, 2, 32)
    direction = torch.randn(32, device=DEV)
    q += direction
    k[0, 100, :] = 4 * direction  # a vertical line at key 100 (block 6)
    o, (bi, bc) = block_sparse_prefill(q, k, v, block_size_q=bq, block_size_k=bk, last_q=8, n_vertical=1, n_slash=1,
                                       n_sink=1, n_local=2, dense_below=0, return_blocks=True, out=poisoned(q),
                                       estimator=estimator, top_p=0.5)
    kend = prefill_kend(T, T, bq, True, DEV)
    for h in range(2):
        for qb in range(T // bq):
            row = bi[0, h, qb, : int(bc[0, h, qb])].tolist()
            assert row == sorted(set(row)) and 0 in row
            assert (int(kend[qb]) - 1) // bk in row  # the diagonal block
            if int(kend[qb]) > 100:
                assert 6 in row
    ref = block_sparse_prefill_naive(q.double(), k.double(), v.double(), bi, bc, bq, bk)
    assert rel(o, ref) < TOL


@pytest.mark.parametrize("T,S,bq,bk,causal", [(100, 100, 16, 16, True), (70, 130, 32, 16, True), (50, 90, 16, 32, False),
                                               (96, 96, 16, 16, True), (40, 170, 16, 32, True), (300, 300, 16, 16, True)])
def test_mass_vertical_slash_scores_match_loop_reference(T, S, bq, bk, causal):
    q, k = rnd(2, T, 3, 16), 2 * rnd(2, S, 1, 16)
    mass = sampled_block_mass(q, k, bq, bk, 2, causal)
    vert, slash = mass_vertical_slash_scores(mass, T, S, bq, bk, causal)
    ref_v, ref_s = mass_vertical_slash_scores_naive(mass, T, S, bq, bk, causal)
    assert rel(vert, ref_v) < TOL and rel(slash, ref_s) < TOL


@pytest.mark.parametrize("T,S,HQ,HKV,bq,bk,top_p", [(240, 240, 4, 2, 16, 16, 0.9), (150, 200, 2, 1, 32, 16, 0.7)])
def test_vertical_slash_mass_recall_bound(T, S, HQ, HKV, bq, bk, top_p):
    """estimator "mass": the pattern ∪ the top-p completion; the kept blocks hold >= top_p of the
    estimated mass in every head and query block, the pattern's blocks are all kept, and the
    attention over them matches the reference."""
    q, k, v = rnd(1, T, HQ, 32), 3 * rnd(1, S, HKV, 32), rnd(1, S, HKV, 32)
    kw = dict(block_size_q=bq, block_size_k=bk, n_vertical=2, n_slash=1, n_sink=1, n_local=1)
    o, (bi, bc) = block_sparse_prefill(q, k, v, dense_below=0, return_blocks=True, out=poisoned(q), top_p=top_p,
                                       sample_rows=4, **kw)
    assert rel(o, block_sparse_prefill_naive(q.double(), k.double(), v.double(), bi, bc, bq, bk)) < TOL
    est = sampled_block_mass_naive(q, k, bq, bk, 4)
    vert, slash = mass_vertical_slash_scores(sampled_block_mass(q, k, bq, bk, 4), T, S, bq, bk)
    cand = vs_pattern(vert, slash, T, S, bq, bk, 2, 1, 1, 1)
    kend = prefill_kend(T, S, bq, True, DEV)
    for h in range(HQ):
        for qb in range(bi.shape[2]):
            row = bi[0, h, qb, : int(bc[0, h, qb])].tolist()
            assert row == sorted(set(row)) and all(0 <= x < -(-int(kend[qb]) // bk) for x in row)
            assert {x for x in cand[0, h, qb].tolist() if x >= 0} <= set(row)
            assert est[0, h, qb, row].sum().item() >= top_p - 1e-4
    # sparser than dense, and the real recall is about top_p
    assert bc.float().sum() < (-(-kend // bk)).float().sum() * HQ
    rec, _ = sparse_quality(q[0], k[0], v[0], bi[0], bc[0], bq, bk)
    assert rec.mean() > top_p - 0.15


def test_sparse_quality_metrics():
    T, bq, bk = 128, 32, 32
    q, k, v = rnd(T, 2, 16), rnd(T, 1, 16), rnd(T, 1, 16)
    nqb = T // bq
    full = torch.arange(4, dtype=torch.int32).expand(2, nqb, 4).contiguous()
    cnt_full = torch.tensor([[1, 2, 3, 4]] * 2, dtype=torch.int32)
    rec, err = sparse_quality(q, k, v, full, cnt_full, bq, bk)
    assert torch.allclose(rec, torch.ones(2, dtype=torch.float64), atol=1e-5) and err.max() < 1e-5
    only_diag = torch.stack([torch.tensor([i, 0, 0, 0]) for i in range(nqb)]).to(torch.int32).expand(2, nqb, 4).contiguous()
    rec2, err2 = sparse_quality(q, k, v, only_diag, torch.ones(2, nqb, dtype=torch.int32), bq, bk)
    assert torch.all(rec2 < 1) and torch.all(err2 > 1e-3)
