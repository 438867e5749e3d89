"""Issue 14's "first hour" of a new user: what the CLI and the Python API print, where, and what they count.

Real indexes built through the pipeline, the real CLI (in process, or as `retrogram` in a child process
where exit codes, streams or servers matter)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(600)


def _env(**kw) -> dict:
    """The environment of a child process as a user has it: no settings that quiet transformers."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env.update(HF_HUB_OFFLINE="1", **kw)
    return env


def test_python_api_loads_the_embedder_without_transformers_bars():
    """Embedder.load() (the Python API: no CLI set-up) prints no weight-loading bar, and leaves transformers'
    own settings as it found them."""
    code = ("from transformers.utils import logging as l\n"
            "from retrogram.index.embedder import Embedder\n"
            "e = Embedder.load(device='cpu')\n"
            "print(e.dim, l.is_progress_bar_enabled(), l.get_verbosity())\n")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr
    from transformers.utils import logging as hf_logging

    assert r.stdout.split() == ["384", "True", str(hf_logging.WARNING)]
    assert "Loading weights" not in r.stderr and "it/s" not in r.stderr, r.stderr
