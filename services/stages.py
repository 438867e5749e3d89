"""The build-index pipeline: every stage, in order. Stages live with the package that owns their data."""

from __future__ import annotations

from ..index.build import Stage
from ..index.stages.tokenize import TOKENIZE
from ..ngram.build import NGRAM
from ..index.stages.chunks import CHUNKS
from ..index.stages.embeddings import EMBEDDINGS
from ..index.stages.faiss import FAISS


def pipeline_stages() -> list[Stage]:
    return [TOKENIZE, NGRAM, CHUNKS, EMBEDDINGS, FAISS]


def stage_names() -> list[str]:
    return [s.name for s in pipeline_stages()]
