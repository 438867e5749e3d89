"""The decoder's fused elementwise kernels (rmsnorm, rope_cache_write, swiglu) against their PyTorch references:
float32 in Triton's interpreter here; bf16 on a GPU under the `gpu` marker, where they must round as torch does
(equal up to one rounding step)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

import pytest  # noqa: E402
import torch  # noqa: E402

from retrogram.kernels.norm_matvec import norm_matvec, norm_matvec_naive  # noqa: E402
from retrogram.kernels.rmsnorm import rmsnorm, rmsnorm_naive  # noqa: E402
from retrogram.kernels.rope_cache import rope_cache_write, rope_cache_write_naive  # noqa: E402
from retrogram.kernels.swiglu import swiglu, swiglu_naive  # noqa: E402
from retrogram.kernels.testing import DEV, DTYPE  # noqa: E402

GPU = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                         reason="needs CUDA with the interpreter off (TRITON_INTERPRET=0 pytest -m gpu)")


def angles(N, D, device, scale=1.0):
    a = torch.randn(N, D // 2, device=device) * 3
    a = torch.cat((a, a), dim=-1)
    return a.cos() * scale, a.sin() * scale


def check_rmsnorm(N, dim, residual, dtype, device):
    x = torch.randn(N, dim, device=device).to(dtype)
    r = torch.randn(N, dim, device=device).to(dtype) if residual else None
    w = (torch.rand(dim, device=device) + 0.5).to(dtype)
    (y, h), (y_ref, h_ref) = rmsnorm(x, w, 1e-5, r), rmsnorm_naive(x, w, 1e-5, r)
    return (y.float() - y_ref.float()).abs().max().item(), (h.float() - h_ref.float()).abs().max().item(), y_ref


def check_rope(N, HQ, HKV, D, dtype, device, scale=1.0):
    qkv = torch.randn(N, (HQ + 2 * HKV) * D, device=device).to(dtype)
    cos, sin = angles(N, D, device, scale)
    page = 8
    pages = N // page + 2
    kc = torch.full((pages, page, HKV, D), float("nan"), device=device, dtype=dtype)
    vc = kc.clone()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    slots = torch.randperm(pages * page, device=device)[:N]
    if N > 2:
        slots[1] = -1   # a padding token: nothing written
    q = rope_cache_write(qkv, cos, sin, kc, vc, slots, HQ, HKV)
    q_ref = rope_cache_write_naive(qkv, cos, sin, kc_ref, vc_ref, slots, HQ, HKV)
    same_nan = torch.equal(kc.isnan(), kc_ref.isnan()) and torch.equal(vc.isnan(), vc_ref.isnan())
    diff = max((q.float() - q_ref.float()).abs().max().item(),
               (kc.nan_to_num() - kc_ref.nan_to_num()).float().abs().max().item(),
               (vc.nan_to_num() - vc_ref.nan_to_num()).float().abs().max().item())
    return diff, same_nan


@pytest.mark.parametrize("N,dim", [(1, 576), (7, 64), (3, 2048), (2, 100)])
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm(N, dim, residual):
    dy, dh, ref = check_rmsnorm(N, dim, residual, DTYPE, DEV)
    assert dy <= 1e-5 * ref.abs().max().item() and dh == 0


@pytest.mark.parametrize("N,HQ,HKV,D", [(1, 9, 3, 64), (5, 4, 4, 32), (6, 8, 2, 128), (3, 2, 1, 16)])
@pytest.mark.parametrize("scale", [1.0, 1.2])   # YaRN scales cos and sin
def test_rope_cache_write(N, HQ, HKV, D, scale):
    diff, same_nan = check_rope(N, HQ, HKV, D, DTYPE, DEV, scale)
    assert same_nan, "the kernel wrote other slots than the reference (or a padding token's)"
    assert diff <= 1e-5


@pytest.mark.parametrize("N,inter", [(1, 1536), (4, 100), (2, 8192)])
def test_swiglu(N, inter):
    x = torch.randn(N, 2 * inter, device=DEV, dtype=DTYPE) * 4
    ref = swiglu_naive(x)
    assert (swiglu(x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_bad_arguments_named():
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(x, torch.ones(7, device=DEV), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm(x, torch.ones(8, device=DEV), 1e-5, torch.randn(3, 8, device=DEV))
    with pytest.raises(ValueError, match="2I"):
        swiglu(torch.randn(2, 7, device=DEV))
    kc = torch.zeros(2, 4, 1, 16, device=DEV)
    with pytest.raises(ValueError, match="qkv"):
        rope_cache_write(torch.randn(2, 40, device=DEV), *angles(2, 16, DEV), kc, kc.clone(),
                         torch.zeros(2, dtype=torch.int64, device=DEV), 2, 1)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_ops_round_as_torch_gpu(dtype):
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for N, dim in ((1, 576), (512, 576), (3, 2048)):
        for res in (False, True):
            dy, dh, ref = check_rmsnorm(N, dim, res, dtype, "cuda")
            assert dh == 0 and dy <= ulp * ref.abs().max().item()
    for N, HQ, HKV, D in ((1, 9, 3, 64), (512, 32, 8, 64), (4, 8, 8, 128)):
        diff, same_nan = check_rope(N, HQ, HKV, D, dtype, "cuda")
        assert same_nan and diff <= 4 * ulp   # one rounding step of values up to ~4 (H100: 1 step seen)
    x = (torch.randn(64, 2 * 1536, device="cuda") * 4).to(dtype)
    y, ref = swiglu(x).float(), swiglu_naive(x).float()
    assert (y - ref).abs().max().item() <= ulp * ref.abs().max().item()   # exp's last bit may differ


def check_norm_matvec(M, K, N, residual, swiglu, dtype, device):
    x = torch.randn(M, K, device=device).to(dtype)
    r = torch.randn(M, K, device=device).to(dtype) if residual else None
    nw = (torch.rand(K, device=device) + 0.5).to(dtype)
    w = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
    (y, h), (y_ref, h_ref) = norm_matvec(x, nw, 1e-5, w, r, swiglu), norm_matvec_naive(x, nw, 1e-5, w, r, swiglu)
    return (y.float() - y_ref.float()).abs().max().item() / y_ref.float().abs().max().item(), \
        (h.float() - h_ref.float()).abs().max().item()


@pytest.mark.parametrize("M,K,N", [(1, 576, 960), (3, 100, 37), (2, 200, 64)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("swiglu", [False, True])
def test_norm_matvec(M, K, N, residual, swiglu):
    dy, dh = check_norm_matvec(M, K, N + (N % 2 if swiglu else 0), residual, swiglu, DTYPE, DEV)
    assert dy <= 1e-5 and dh == 0


def test_norm_matvec_bad_arguments_named():
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="weight must be"):
        norm_matvec(x, torch.ones(8, device=DEV), 1e-5, torch.randn(4, 7, device=DEV))
    with pytest.raises(ValueError, match="even"):
        norm_matvec(x, torch.ones(8, device=DEV), 1e-5, torch.randn(5, 8, device=DEV), swiglu=True)


@pytest.mark.gpu
@GPU
def test_norm_matvec_gpu():
    # bf16: the product's reduction order differs from cuBLAS's (a rounding step of the output at most)
    for M, K, N in ((1, 576, 960), (4, 576, 3072), (1, 2048, 3072), (2, 2048, 16384)):
        for swiglu in (False, True):
            dy, dh = check_norm_matvec(M, K, N, True, swiglu, torch.bfloat16, "cuda")
            assert dh == 0 and dy <= 2 ** -6, (M, K, N, swiglu, dy)
