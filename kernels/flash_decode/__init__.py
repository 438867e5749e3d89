"""Flash-decoding over contiguous or paged KV caches (dense, and block-sparse for hip_attention)."""

from .naive import flash_decode_naive, gather_cache, sparse_decode_keep
from .ops import default_block_n, flash_decode, flash_decode_fwd_kernel, sparse_decode

__all__ = ["flash_decode", "sparse_decode", "flash_decode_fwd_kernel", "flash_decode_naive", "gather_cache",
           "sparse_decode_keep", "default_block_n"]
