"""retrogram.ngram: suffix-array n-gram statistics over an index's token stream (infini-gram v4 shards).

- `Engine`: count, prob, ntd, ∞-gram prob/ntd, CNF counts and document search, documents, batched
  `count_many` and `score_sequence`; infini-gram's API (see engine.py).
- `NGRAM`: the build-index stage that writes IDX/ngram/ (see build.py), registered in the pipeline when
  this package is imported; `pipeline_stages()` here is index's stages and this one (index/stages/__init__.py).
"""

from ..index.stages import pipeline_stages, register_stage, stage_names
from .build import NGRAM
from .engine import Engine, QueryError

register_stage(NGRAM)

__all__ = ["NGRAM", "Engine", "QueryError", "pipeline_stages", "stage_names"]
