"""The packages keep DESIGN's layering (contracts in pyproject.toml, [tool.importlinter])."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_code_keeps_the_layering(tmp_path):
    exe = shutil.which("lint-imports") or str(Path(__import__("sys").executable).parent / "lint-imports")
    out = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def _contracts():
    import grimp
    import importlinter.configuration
    from importlinter.application.use_cases import read_user_options
    from importlinter.contracts.forbidden import ForbiddenContract
    from importlinter.contracts.layers import LayersContract

    importlinter.configuration.configure()
    opts = read_user_options(str(REPO / "pyproject.toml"))
    kinds = {"layers": LayersContract, "forbidden": ForbiddenContract}
    contracts = {c["id"]: kinds[c["type"]](name=c["name"], session_options=opts.session_options, contract_options=c)
                 for c in opts.contracts_options}
    return contracts, lambda: grimp.build_graph(*opts.session_options["root_packages"])


# One import each contract must refuse: (contract id, importer, imported).
REVERSED = [
    ("layers", "retrogram.kernels.flash_decode.ops", "retrogram.retro"),
    ("layers", "retrogram.index.store", "retrogram.ngram.engine"),
    ("layers", "retrogram.retro", "retrogram.services.cli"),
    ("index-kernels", "retrogram.index.store", "retrogram.kernels.flash_decode"),
    ("ngram-kernels", "retrogram.ngram.engine", "retrogram.kernels.topk_scan"),
    ("protos", "retrogram.retro", "retrogram.protos.ngram_pb2"),
    ("protos-leaf", "retrogram.protos.ngram_pb2", "retrogram.index.errors"),
]


@pytest.mark.parametrize("contract_id, importer, imported", REVERSED)
def test_a_reversed_import_breaks_its_contract(contract_id, importer, imported):
    contracts, build = _contracts()
    graph = build()
    graph.add_import(importer=importer, imported=imported)
    assert not contracts[contract_id].check(graph, verbose=False).kept
