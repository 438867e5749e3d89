"""HiP attention: hierarchical top-k block selection with sparse prefill and decode."""

from .naive import bound_score_naive, hip_attention_naive, hip_decode_naive, hip_decode_select_naive, score_naive
from .ops import (bound_rows, bound_score_triton, hip_attention_prefill, hip_block_list, hip_decode, hip_decode_select,
                  hip_select, key_bound_tables, prefill_kend, score_triton)

__all__ = ["bound_rows", "bound_score_triton", "key_bound_tables", "bound_score_naive",
           "hip_attention_prefill", "hip_decode", "hip_decode_select", "hip_select", "hip_block_list",
           "score_triton", "prefill_kend", "score_naive", "hip_attention_naive",
           "hip_decode_naive", "hip_decode_select_naive"]
