"""Shared paths and loaders for the operator and chart tests."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
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


def kubectl(env: dict[str, str], *args: str, stdin: str | None = None, check: bool = True) -> str:
    """The real kubectl with `env` (its KUBECONFIG names the emulator); asserts success when `check`."""
    run = subprocess.run(
        [tool("kubectl"), *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
    )
    if check:
        assert run.returncode == 0, f"kubectl {' '.join(args)}: {run.stdout}{run.stderr}"
    return run.stdout


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll `fn` every 0.2 s until it returns something truthy (returned); assertion, key and index
    errors count as not yet. Fails naming `what` and the last result after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except (AssertionError, KeyError, IndexError) as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")
