"""The operator imports no torch (its image installs none): checked in a fresh interpreter, and on the
operator process that the e2e tests start (test_e2e.py::test_running_operator_maps_no_libtorch)."""

from __future__ import annotations

import subprocess
import sys

from dsv3.operator.trainer_status import read_trainer_status

PROBE = """
import sys
import dsv3.operator.__main__, dsv3.operator.handlers, dsv3.operator.kube, dsv3.operator.trainer_status
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.") or m == "dsv3.model")
maps = open("/proc/self/maps").read()
print("modules", bad, "libtorch", "libtorch" in maps)
"""


def test_importing_the_operator_loads_no_torch() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "modules [] libtorch False"


def test_operator_distribution_does_not_depend_on_torch_or_the_core() -> None:
    from importlib.metadata import requires

    deps = [r.split(";")[0].strip().lower() for r in requires("dsv3-operator") or []]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert "torch" not in names and "dsv3" not in names and "dsv3-rpc" in names


def test_trainer_status_is_none_without_the_trainer_stub_or_an_answer() -> None:
    # trainer.proto lands with the trainer; until then (or with nothing listening) the job status
    # simply lacks step/loss instead of failing the reconcile.
    assert read_trainer_status("127.0.0.1:9", timeout=0.2) is None
