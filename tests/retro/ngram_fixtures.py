"""A real small n-gram index (the `small_corpus` slice of the demo corpus, SmolLM2 tokens) for the ∞-gram
tests of retro/. Import them into a test module (`from ngram_fixtures import engine_fixture,
ngram_index_fixture`); the tests ask for them as `ngram_index` and `engine`."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import build_ngram_index


@pytest.fixture(scope="module", name="ngram_index")
def ngram_index_fixture(tmp_path_factory, small_corpus) -> Path:
    return build_ngram_index(tmp_path_factory.mktemp("retro_ngram") / "idx", small_corpus)


@pytest.fixture(scope="module", name="engine")
def engine_fixture(ngram_index):
    from retrogram.ngram.engine import Engine

    return Engine(ngram_index)
