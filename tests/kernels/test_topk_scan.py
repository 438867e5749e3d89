"""The fused scan + top-k kernel against torch.topk(q @ db.T), under the Triton interpreter (fp32) on CPU
(in a subprocess, so TRITON_INTERPRET is set before Triton compiles anything), and on CUDA when present."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

CHECK = textwrap.dedent("""
    import torch
    from retrogram.kernels.topk_scan import topk_scan, topk_scan_naive
    torch.manual_seed(0)
    for M, N, D, k in [(37, 1000, 64, 10), (5, 301, 128, 1), (20, 513, 48, 16), (3, 40, 32, 40)]:
        q, db = torch.randn(M, D), torch.randn(N, D)
        v, i = topk_scan(q, db, k)
        rv, ri = topk_scan_naive(q, db, k)
        assert v.shape == (M, k) and i.dtype == torch.int64
        assert torch.allclose(v, rv, atol=1e-4, rtol=1e-4), (M, N, D, k)
        assert torch.equal(i, ri), (M, N, D, k)
        # the ids' scores are the reported ones
        assert torch.allclose((q @ db.T).gather(1, i), v, atol=1e-4)
    for bad in [dict(k=0), dict(k=41)]:
        try:
            topk_scan(torch.randn(2, 32), torch.randn(40, 32), **bad)
        except ValueError:
            pass
        else:
            raise AssertionError(bad)
    print("ok")
""")


def test_topk_scan_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-P", "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_topk_scan_cuda_fp16():
    from retrogram.kernels.topk_scan import topk_scan, topk_scan_naive

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(300, 384, device="cuda", generator=g).half()
    db = torch.randn(100_000, 384, device="cuda", generator=g).half()
    q.fill_(float("nan")).normal_(generator=g)   # poisoned, then refilled
    v, i = topk_scan(q, db, 10)
    rv, ri = topk_scan_naive(q, db, 10)
    assert torch.allclose(v, rv, atol=1e-3)
    assert (i == ri).float().mean() > 0.999
