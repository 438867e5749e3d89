"""retrogram.kernels: Triton attention kernels, each beside a plain PyTorch reference.

- flash_prefill: dense FlashAttention-2 forward (causal or not, GQA, varlen via cu_seqlens)
- flash_decode: flash-decoding over contiguous or paged KV caches
- block_sparse: block-sparse attention core
- hip_attention: HiP hierarchical top-k block selection, sparse prefill and decode
- block_sparse_prefill: MInference vertical-slash patterns on the block-sparse core
- cca_attention: RETRO chunked cross-attention over cached neighbour K/V
- rmsnorm, rope_cache, swiglu: the decoder layer's elementwise work fused (residual add + RMSNorm; RoPE with the
  K/V written into the paged cache; silu(gate) * up)
- hf: registration as transformers attention implementations

Tensors are [batch, tokens, heads, head_dim] with a contiguous head dim (other strides free).
"""

if __name__ == "kernels":
    # Imported under the bare name: the repository root is on sys.path (`python -m ...` or a script run
    # from the root), so this folder stands where Hugging Face's `kernels` distribution is meant to be
    # found (transformers imports it). Hand the name over to that package, or fail as a missing one would.
    from ._bare_name import hand_over

    hand_over(__name__, __file__)
else:
    from .block_sparse import block_sparse_attention
    from .block_sparse_prefill import block_sparse_prefill
    from .cca_attention import cca_attention
    from .flash_decode import flash_decode, sparse_decode
    from .flash_prefill import flash_prefill
    from .hip_attention import hip_attention_prefill, hip_decode, hip_decode_select

    __all__ = ["flash_prefill", "flash_decode", "sparse_decode", "block_sparse_attention", "hip_attention_prefill",
               "hip_decode", "hip_decode_select", "block_sparse_prefill", "cca_attention"]
