"""retrogram.retro."""
