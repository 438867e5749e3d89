"""HiP attention: hierarchical top-k block selection with sparse prefill and decode."""

from .naive import bound_score_naive, hip_attention_naive, hip_decode_naive, hip_decode_select_naive, score_naive
from .ops import (bound_rows, bound_score_triton, hip_attention_prefill, hip_bound_score_fwd_kernel, key_bound_tables, hip_block_list, hip_decode, hip_decode_select,
                  hip_decode_select_fwd_kernel,
                  hip_score_fwd_kernel, hip_select, prefill_kend, score_triton)

__all__ = ["bound_rows", "bound_score_triton", "hip_bound_score_fwd_kernel", "key_bound_tables", "bound_score_naive",
           "hip_attention_prefill", "hip_decode", "hip_decode_select", "hip_select", "hip_block_list",
           "hip_score_fwd_kernel", "score_triton", "prefill_kend", "score_naive", "hip_attention_naive",
           "hip_decode_naive", "hip_decode_select_fwd_kernel", "hip_decode_select_naive"]
