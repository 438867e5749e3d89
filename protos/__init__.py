"""retrogram.protos."""
