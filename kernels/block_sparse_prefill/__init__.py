"""Vertical-slash (MInference) block-sparse prefill."""

from .naive import block_sparse_prefill_naive, vertical_slash_scores_naive
from .ops import block_sparse_prefill, vertical_slash_blocks, vertical_slash_scores

__all__ = ["block_sparse_prefill", "vertical_slash_blocks", "vertical_slash_scores",
           "block_sparse_prefill_naive", "vertical_slash_scores_naive"]
