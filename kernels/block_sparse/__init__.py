"""Block-sparse attention core (prefill) shared by hip_attention and block_sparse_prefill."""

from .naive import block_mask_dense, block_sparse_attention_naive, sampled_block_mass_naive, topp_block_list_naive
from .ops import (block_mass_fwd_kernel, block_sparse_attention, block_sparse_fwd_kernel, sampled_block_mass,
                  topp_block_list, topp_block_list_fwd_kernel)

__all__ = ["block_sparse_attention", "block_sparse_fwd_kernel", "block_sparse_attention_naive",
           "block_mask_dense", "block_mass_fwd_kernel", "sampled_block_mass", "sampled_block_mass_naive",
           "topp_block_list", "topp_block_list_naive", "topp_block_list_fwd_kernel"]
