"""Shared paths and loaders for the operator and chart tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dsv3"
CRDS = CHART / "files" / "crds"
EXAMPLES = CHART / "examples"
TOOLS = ROOT / ".tools" / "bin"


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def crd_schema(kind: str) -> dict[str, Any]:
    for f in CRDS.glob("*.yaml"):
        crd = load(f)
        if crd["spec"]["names"]["kind"] == kind:
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise KeyError(kind)


def tool(name: str) -> str:
    """Path of helm/kubectl installed by scripts/install_k8s_tools.sh (missing: the setup was skipped)."""
    path = TOOLS / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: run scripts/install_k8s_tools.sh (scripts/setup.sh does)")
    return str(path)
