"""The kernels compiled for a real GPU, in bf16 at sizes that reach every launch path, each against its float64
reference (retrogram.kernels.testing: the same checks bench.kernels records beside its timings).

Under the `gpu` marker; they skip without CUDA, and under Triton's interpreter, which the CPU kernel tests
switch on for the whole process: run them as `TRITON_INTERPRET=0 pytest -m gpu`.
"""

import os

import pytest
import torch

from retrogram.kernels import testing as kt
from retrogram.kernels.testing import (FLASH_DECODE_CASES, FLASH_PREFILL_CASES, HIP_DECODE_SELECT_CASES,
                                       HIP_PREFILL_MASS_CASES, MASS_BIG_T, MASS_SMALL_T, TOPK_SCAN_CASES,
                                       TOPP_VARIANTS)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="Triton's interpreter is on in this process: run TRITON_INTERPRET=0 pytest -m gpu"),
]


def case_id(case) -> str:
    return "-".join(str(x) for x in case)


def assert_ok(check):
    assert check.ok, check.record()


@pytest.mark.parametrize("case", FLASH_PREFILL_CASES, ids=case_id)
def test_flash_prefill(case):
    assert_ok(kt.check_flash_prefill(*case))


def test_flash_prefill_varlen():
    assert_ok(kt.check_flash_prefill_varlen())


@pytest.mark.parametrize("case", FLASH_DECODE_CASES, ids=case_id)
def test_flash_decode(case):
    assert_ok(kt.check_flash_decode(*case))


@pytest.mark.parametrize("case", HIP_DECODE_SELECT_CASES, ids=case_id)
def test_hip_decode_select_picks_the_multi_launch_blocks(case):
    assert_ok(kt.check_hip_decode_select(*case))


def test_hip_decode_paged():
    assert_ok(kt.check_hip_decode_paged())


def test_hip_prefill_block_sparse():
    assert_ok(kt.check_hip_prefill())


@pytest.mark.parametrize("case", HIP_PREFILL_MASS_CASES, ids=case_id)
def test_hip_prefill_mass(case):
    assert_ok(kt.check_hip_prefill_mass(*case))


def test_vs_prefill_block_sparse():
    assert_ok(kt.check_vs_prefill())


def test_block_sparse_prefill():
    assert_ok(kt.check_block_sparse_prefill())


def test_cca():
    assert_ok(kt.check_cca())


@pytest.mark.parametrize("T", MASS_SMALL_T)
def test_sampled_block_mass(T):
    assert_ok(kt.check_sampled_block_mass(T))


@pytest.mark.parametrize("T", MASS_SMALL_T)
def test_mass_vertical_slash_scores(T):
    assert_ok(kt.check_mass_vertical_slash_scores(T))


@pytest.mark.parametrize("variant", TOPP_VARIANTS)
@pytest.mark.parametrize("T", MASS_BIG_T)
def test_topp_block_list(T, variant):
    assert_ok(kt.check_topp_block_list(T, variant))


@pytest.mark.parametrize("case", TOPK_SCAN_CASES, ids=case_id)
def test_topk_scan(case):
    assert_ok(kt.check_topk_scan(*case))
