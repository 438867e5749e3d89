"""HiP attention: hierarchical top-k block selection with sparse prefill and decode."""

from .naive import hip_attention_naive, hip_decode_naive, score_naive
from .ops import (hip_attention_prefill, hip_block_list, hip_decode, hip_decode_select,
                  hip_score_fwd_kernel, hip_select, prefill_kend, score_triton)

__all__ = ["hip_attention_prefill", "hip_decode", "hip_decode_select", "hip_select", "hip_block_list",
           "hip_score_fwd_kernel", "score_triton", "prefill_kend", "score_naive", "hip_attention_naive",
           "hip_decode_naive"]
