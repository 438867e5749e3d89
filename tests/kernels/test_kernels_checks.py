"""The GPU checks of retrogram.kernels.testing, each run once at toy sizes (f divides the lengths) in Triton's
interpreter on a CPU in float32: their inputs, references and comparisons work before a GPU runs them at full
size (tests/kernels/test_kernels_gpu.py, bench.kernels.attention --checks)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

import pytest  # noqa: E402
import torch  # noqa: E402

from retrogram.kernels import testing as kt  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="toy sizes in Triton's interpreter")
CPU = dict(device="cpu", dtype=torch.float32)

CHECKS = {
    "flash_prefill": lambda: kt.check_flash_prefill(*kt.FLASH_PREFILL_CASES[1], f=32, **CPU),
    "flash_prefill_varlen": lambda: kt.check_flash_prefill_varlen(f=32, **CPU),
    "flash_decode_paged_waves": lambda: kt.check_flash_decode(*kt.FLASH_DECODE_CASES[4], f=64, **CPU),
    "hip_decode_select_paged": lambda: kt.check_hip_decode_select(*kt.HIP_DECODE_SELECT_CASES[1], f=64, **CPU),
    "hip_decode_paged": lambda: kt.check_hip_decode_paged(f=32, **CPU),
    "hip_prefill": lambda: kt.check_hip_prefill(f=32, **CPU),
    "vs_prefill": lambda: kt.check_vs_prefill(f=32, **CPU),
    "cca": lambda: kt.check_cca(f=32, **CPU),
    "sampled_block_mass": lambda: kt.check_sampled_block_mass(2000, H=2, D=32, f=8, **CPU),
    "mass_vertical_slash_scores": lambda: kt.check_mass_vertical_slash_scores(2000, H=2, D=32, f=8, **CPU),
    **{f"topp_block_list {v}": (lambda v=v: kt.check_topp_block_list(32768, v, HQ=2, D=32, f=64, **CPU))
       for v in kt.TOPP_VARIANTS},
    "hip_prefill_mass": lambda: kt.check_hip_prefill_mass(4096, 0.9, 2, H=2, D=32, f=16, **CPU),
    "block_sparse_prefill": lambda: kt.check_block_sparse_prefill(H=2, D=32, f=8, **CPU),
    "topk_scan": lambda: kt.check_topk_scan(5, 700, 32, 8, device="cpu"),
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_check_passes_at_toy_size(name):
    check = CHECKS[name]()
    assert check.ok, check.record()
    assert check.err < check.tol and check.record()["ok"]


def test_a_wrong_output_fails_its_check():
    # the comparison itself: an output off by 2% of its norm fails the bf16 tolerance; a NaN (unwritten) fails
    ref = torch.randn(64, dtype=torch.float64)
    off = (ref + 0.02 * ref.norm() / 8 * torch.ones_like(ref)).float()
    assert not kt.Check("x", kt.rel(off, ref), kt.GPU_TOL).ok
    nan = ref.float().clone()
    nan[3] = float("nan")
    assert kt.rel(nan, ref) != kt.rel(nan, ref) and not kt.Check("x", kt.rel(nan, ref), kt.GPU_TOL).ok
    assert kt.Check("x", kt.rel(ref.float(), ref), kt.GPU_TOL).ok
