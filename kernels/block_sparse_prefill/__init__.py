"""Vertical-slash (MInference) block-sparse prefill."""

from .naive import block_sparse_prefill_naive, mass_vertical_slash_scores_naive, vertical_slash_scores_naive
from .ops import (block_sparse_prefill, mass_vertical_slash_scores, mass_vertical_slash_scores_fwd_kernel,
                  vertical_slash_blocks, vertical_slash_scores, vs_pattern)

__all__ = ["block_sparse_prefill", "vertical_slash_blocks", "vertical_slash_scores", "mass_vertical_slash_scores",
           "mass_vertical_slash_scores_fwd_kernel",
           "vs_pattern", "block_sparse_prefill_naive", "vertical_slash_scores_naive", "mass_vertical_slash_scores_naive"]
