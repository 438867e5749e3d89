"""The build-index pipeline: every stage, in order. Stages live with the package that owns their data."""

from __future__ import annotations

from ..index.build import Stage
from ..index.tokenize import TOKENIZE
from ..ngram.build import NGRAM


def pipeline_stages() -> list[Stage]:
    return [TOKENIZE, NGRAM]


def stage_names() -> list[str]:
    return [s.name for s in pipeline_stages()]
