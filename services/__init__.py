"""retrogram.services."""
