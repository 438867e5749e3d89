"""Chunked cross-attention (RETRO) over cached neighbour K/V."""

from .naive import cca_attention_naive
from .ops import cca_attention, cca_cu_seqlens

__all__ = ["cca_attention", "cca_cu_seqlens", "cca_attention_naive"]
