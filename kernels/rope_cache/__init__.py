"""RoPE of a step's new queries and keys with the keys and values written into the paged KV cache, in one
kernel (the decoder's attention input)."""

from .naive import rope_cache_write_naive, rope_naive
from .ops import rope_cache_write

__all__ = ["rope_cache_write", "rope_cache_write_naive", "rope_naive"]
