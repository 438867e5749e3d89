"""The build-index pipeline: a registry of stages that each package fills when it is imported.

A stage lives with the package that owns its data: tokenize, chunks, embeddings and faiss here in index
(one module per stage, named for it), the n-gram suffix arrays in ngram (ngram/build.py), and RETRO's
neighbours and encoded chunks in retro. The layering lets a package import only the packages below it,
so index cannot name ngram's stage (nor retro's); instead each package registers its stages here when it
is imported (`register_stage`, called by the package's __init__), and `pipeline_stages()` is the pipeline
of the packages imported so far, in `Stage.order`:

    index   tokenize 10, chunks 30, embeddings 40, faiss 50
    ngram   ngram 20                        (retrogram.ngram's __init__)
    retro   neighbours, encoded chunks      (the same way: order above 50, requires faiss / chunks)

The full pipeline is assembled where every package is visible: each package that adds stages re-exports
`pipeline_stages` and `stage_names`, so importing them from the highest such package (today
`retrogram.ngram`; the CLI's build-index does) is what registers everything below it. `run_build` and
`append_documents` take the list, so a caller can also pass any list of stages it builds itself.
"""

from __future__ import annotations

from ..build import Stage

_REGISTRY: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add a stage to the pipeline (again: the same stage is a no-op). Its required stages must be registered
    first, with a lower order: a package registers its stages after those of the packages it builds on."""
    old = _REGISTRY.get(stage.name)
    if old is not None and old != stage:
        raise ValueError(f"stage {stage.name!r}: another stage of that name is registered ({old.summary!r})")
    for dep in stage.requires:
        if dep not in _REGISTRY:
            raise ValueError(f"stage {stage.name!r}: requires {dep!r}, which is not registered")
        if _REGISTRY[dep].order >= stage.order:
            raise ValueError(f"stage {stage.name!r} (order {stage.order}): must come after {dep!r} "
                             f"(order {_REGISTRY[dep].order})")
    _REGISTRY[stage.name] = stage
    return stage


def pipeline_stages() -> list[Stage]:
    """Every registered stage, in pipeline order."""
    return sorted(_REGISTRY.values(), key=lambda s: s.order)


def stage_names() -> list[str]:
    return [s.name for s in pipeline_stages()]


from .chunks import CHUNKS  # noqa: E402  (the stage modules import ..build, not this package's names)
from .embeddings import EMBEDDINGS  # noqa: E402
from .faiss import FAISS  # noqa: E402
from .tokenize import TOKENIZE  # noqa: E402

for _stage in (TOKENIZE, CHUNKS, EMBEDDINGS, FAISS):
    register_stage(_stage)

__all__ = ["CHUNKS", "EMBEDDINGS", "FAISS", "TOKENIZE", "pipeline_stages", "register_stage", "stage_names"]
