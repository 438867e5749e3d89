"""retrogram.index."""


def __getattr__(name):  # lazy: `from retrogram.index import Retriever` without importing torch/faiss up front
    if name in ("Retriever", "Neighbour"):
        from . import retriever

        return getattr(retriever, name)
    raise AttributeError(f"module 'retrogram.index' has no attribute {name!r}")
