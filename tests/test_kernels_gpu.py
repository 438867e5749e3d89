"""The kernels compiled for a real GPU (bf16): runs bench/bench_kernels.py's correctness checks in a
separate process (the CPU tests run Triton's interpreter in this one). Skips without CUDA."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_on_gpu():
    code = ("import sys, bench_kernels as b; b.checks(); "
            "bad = [c for c in b.RESULTS['checks'] if not c['ok']]; "
            "sys.exit(1 if bad or b.RESULTS['errors'] or not b.RESULTS['checks'] else 0)")
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-P", "-c", code], cwd=os.path.join(ROOT, "bench"), env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
