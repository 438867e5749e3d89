"""Benchmarks of retrogram, by area (kernels, index, ngram, retrieval, services), run from the repository root
as modules: `python -m bench.kernels.attention --help`. Not part of the installed package; see README.md."""
