"""The card's top-level folders install as subpackages of `retrogram`, beside Hugging Face's `kernels`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, mapping = set(cfg["packages"]), cfg["package-dir"]
    found = set()
    for pkg, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            if "__pycache__" not in rel.parts:
                found.add(".".join([pkg, *rel.parts]))
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"listed packages with no folder: {sorted(listed - found)}"


def test_hf_kernels_and_retrogram_kernels_import_side_by_side(tmp_path):
    # From a neutral directory, so the repository root is not on sys.path.
    code = ("import kernels, retrogram.kernels as rk; "
            "assert kernels.__file__ != rk.__file__; "
            "assert hasattr(kernels, 'get_kernel'), kernels.__file__; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cli_help_for_every_subcommand():
    from retrogram.services.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"build-index", "info"} <= set(sub.choices)
    for name in sub.choices:
        out = subprocess.run([sys.executable, "-m", "retrogram.services.cli", name, "--help"],
                             capture_output=True, text=True)
        assert out.returncode == 0, (name, out.stderr)
        assert "usage:" in out.stdout
