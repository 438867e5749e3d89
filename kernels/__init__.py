"""retrogram.kernels."""
