"""retrogram.index: an index directory (token stream, document store, chunks, embeddings, FAISS) and its build.

`Index.open(dir)` is the one handle on a built index (handle.py); `Retriever` searches its chunks.
"""

from .handle import Index

__all__ = ["Index", "Neighbour", "Retriever"]


def __getattr__(name):  # lazy: `from retrogram.index import Retriever` without importing torch/faiss up front
    if name in ("Retriever", "Neighbour"):
        from . import retriever

        return getattr(retriever, name)
    raise AttributeError(f"module 'retrogram.index' has no attribute {name!r}")
