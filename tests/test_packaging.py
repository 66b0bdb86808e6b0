"""The package declares version ranges, so installing it keeps a researcher's own torch build."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_torch_is_a_range_in_the_package_and_pinned_only_in_the_constraints_file():
    deps = {Requirement(d).name: Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())
            ["project"]["dependencies"]}
    for name in ("torch", "torchvision"):
        ops = {spec.operator for spec in deps[name].specifier}
        assert ops and ops <= {">=", "<", "<=", ">", "!="}, f"{name} must be a range in pyproject.toml: {deps[name]}"
    pins = {Requirement(line).name: Requirement(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    for name in ("torch", "torchvision"):
        (spec,) = pins[name].specifier
        assert spec.operator == "==", f"constraints.txt must pin {name} exactly"
        assert deps[name].specifier.contains(spec.version), f"the pinned {name} {spec.version} is outside the range"
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text(), "make must install with the constraints file"
