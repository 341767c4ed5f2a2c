"""The layer contracts of pyproject.toml hold on the tree, and each one catches an import against it.

`lint-imports` (import-linter) is run as CI runs it. To show that a contract can fail, the
packages are copied to a temporary folder, one import against the contract is added there, and
`lint-imports` checks that contract on the copy (found first on PYTHONPATH).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(pythonpath)
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _contract_ids() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return [contract["id"] for contract in config["contracts"]]


def test_the_tree_keeps_every_contract():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(_contract_ids())} kept, 0 broken." in result.stdout


#: contract id -> (module added to the copy, its source): one import against that contract
VIOLATIONS = {
    "layers": ("ditf_pipeline/datasets/_against.py", "from ..extract import extractor\n"),
    "acyclic-siblings": ("ditf_pipeline/match/_against.py", "from . import predict\n"),
    "store-imports-no-stage": ("ditf_pipeline/store/_against.py", "from ..match import features\n"),
    "score-without-torch": ("ditf_pipeline/score/_against.py", "import torch\n"),
    "no-models-after-extraction": ("ditf_pipeline/match/_against.py", "from ..models import base\n"),
    "core-datasets-without-torch-zarr": ("ditf_pipeline/core/_against.py", "import numpy\nimport zarr\n"),
    "only-store-imports-zarr": ("ditf_pipeline/view/_against.py", "import zarr\n"),
    "cli-imports-orchestration": ("ditf_cli/_against.py", "from ditf_pipeline.match import matchers\n"),
}


def test_every_contract_has_a_violation_below():
    assert set(VIOLATIONS) == set(_contract_ids())


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """The packages as they are installed (ditf_cli lives in ./cli) plus the contracts."""
    root = tmp_path_factory.mktemp("tree")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "ditf_pipeline", root / "ditf_pipeline", ignore=ignore)
    shutil.copytree(ROOT / "cli", root / "ditf_cli", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.mark.parametrize("contract", sorted(VIOLATIONS))
def test_an_import_against_a_contract_breaks_it(tree_copy, contract):
    kept = _lint(tree_copy, "--contract", contract, pythonpath=tree_copy)
    assert kept.returncode == 0, kept.stdout + kept.stderr  # the copy itself keeps it
    relative, source = VIOLATIONS[contract]
    module = tree_copy / relative
    if contract == "acyclic-siblings":  # a cycle needs the way back too: predict -> _against
        target = tree_copy / "ditf_pipeline/match/predict.py"
        original = target.read_text()
        target.write_text(original + "\nfrom . import _against  # noqa: E402\n")
    module.write_text(source)
    try:
        broken = _lint(tree_copy, "--contract", contract, pythonpath=tree_copy)
    finally:
        module.unlink()
        if contract == "acyclic-siblings":
            target.write_text(original)
    assert broken.returncode != 0, broken.stdout
    assert "BROKEN" in broken.stdout and "_against" in broken.stdout, broken.stdout
