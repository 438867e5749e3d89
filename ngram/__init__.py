"""retrogram.ngram."""
