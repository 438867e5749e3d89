"""retrogram.index."""
