"""A decode step's RMSNorm (with the residual add) fused into the projection after it: y = W @ norm(x + residual),
optionally with SwiGLU on the gate|up halves. For the few rows of a decode step, where each projection is a
matrix-vector product bound by reading W."""

from .naive import norm_matvec_naive
from .ops import norm_matvec

__all__ = ["norm_matvec", "norm_matvec_naive"]
