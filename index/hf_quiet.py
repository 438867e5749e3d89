"""transformers' own console output (weight-loading bars, info logs) off while this package loads a model.

The CLI hides them with environment variables set before transformers is imported; the Python API must not
print them either, and must not leave transformers' settings changed for the caller, so each load runs
inside `quiet_hf()`, which restores what it found."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_hf():
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)
