"""Exact inner-product search: a fused Triton scan + top-k kernel and its PyTorch reference."""

from .naive import topk_scan_naive
from .ops import topk_scan, topk_scan_fwd_kernel

__all__ = ["topk_scan", "topk_scan_fwd_kernel", "topk_scan_naive"]
