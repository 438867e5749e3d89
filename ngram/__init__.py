"""retrogram.ngram: suffix-array n-gram statistics over an index's token stream (infini-gram v4 shards).

- `Engine`: count, prob, ntd, ∞-gram prob/ntd, CNF counts and document search, documents, batched
  `count_many` and `score_sequence`; infini-gram's API (see engine.py).
- `NGRAM`: the build-index stage that writes IDX/ngram/ (see build.py).
"""

from .engine import Engine, QueryError

__all__ = ["Engine", "QueryError"]
