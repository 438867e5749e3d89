"""Dense flash-attention prefill: Triton kernel and its PyTorch reference."""

from .naive import attention_naive, flash_prefill_naive
from .ops import flash_prefill, flash_prefill_fwd_kernel

__all__ = ["flash_prefill", "flash_prefill_fwd_kernel", "flash_prefill_naive", "attention_naive"]
