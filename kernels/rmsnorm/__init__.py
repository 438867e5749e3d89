"""RMSNorm with the residual add fused in (the decoder's two norms a layer), as transformers' LlamaRMSNorm."""

from .naive import rmsnorm_naive
from .ops import rmsnorm

__all__ = ["rmsnorm", "rmsnorm_naive"]
