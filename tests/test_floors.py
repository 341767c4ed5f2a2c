"""constraints-min.txt (what CI installs to prove the floors) must say exactly what pyproject.toml admits."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _floors() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(line)
        lows = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert lows, f"{line}: every direct dependency needs a >= floor"
        names = ["dask", "distributed"] if requirement.name == "dask" else [requirement.name]  # dask[distributed]
        for name in names:
            floors[canonicalize_name(name)] = lows[0]
    return floors


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints-min.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_constraints_min_pins_every_floor():
    floors, pins = _floors(), _pins()
    floors.pop("torch")  # CI keeps the CPU wheel torch==2.13.0; it must be admitted
    assert Version("2.13.0") in Requirement(next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "project"]["dependencies"] if d.startswith("torch"))).specifier
    assert set(pins) == set(floors), (set(pins) ^ set(floors))
    for name, floor in floors.items():
        assert pins[name] == floor, f"{name}: pyproject says >= {floor}, constraints-min.txt pins {pins[name]}"
