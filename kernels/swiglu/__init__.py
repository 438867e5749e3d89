"""SwiGLU's gate: silu(gate) * up of the fused gate|up projection, in one kernel."""

from .naive import swiglu_naive
from .ops import swiglu

__all__ = ["swiglu", "swiglu_naive"]
