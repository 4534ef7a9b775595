"""A delete that lands while the resync timer is mid-reconcile. Kopf keeps the finalizer until a running
timer has exited, and by default looks again only after 60 s, so such a `kubectl delete` hung for a
minute. The real operator runs as a subprocess against the KMock emulator (not a cluster); its
reconcile is stretched by a wrapper to end with 2 s of waiting (as one waiting out the trainer status
RPC's timeout does), so the delete is sent while a timer's reconcile is known to be in flight, and that
reconcile, having read the pods before they were deleted, writes nothing that would wake Kopf up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kube_emulator import kubeconfig, serve
from op_helpers import CRDS, EXAMPLES, ROOT, kubectl, wait_for

pytestmark = pytest.mark.timeout(120)

SLOW_OPERATOR = """
import pathlib, sys, time
from dsv3.operator import __main__ as entry, handlers
marker, real = pathlib.Path(sys.argv[1]), handlers.reconcile_training
def slow_reconcile(*args, **kwargs):
    marker.touch()
    with marker.with_suffix(".calls").open("a") as calls:
        calls.write(".")  # one dot per reconcile
    try:
        return real(*args, **kwargs)
    finally:
        time.sleep(2.0)
        marker.unlink(missing_ok=True)
handlers.reconcile_training = slow_reconcile
entry.main([])
"""


def test_a_job_deleted_mid_reconcile_is_gone_within_seconds(tmp_path: Path) -> None:
    with serve() as (_, port):
        (tmp_path / "config").write_text(kubeconfig(port))
        env = {**os.environ, "KUBECONFIG": str(tmp_path / "config")}

        for crd in sorted(CRDS.glob("*.yaml")):
            kubectl(env, "create", "--validate=false", "-f", str(crd))
        marker = tmp_path / "reconciling"
        log = (tmp_path / "operator.log").open("w")
        op = subprocess.Popen(
            [sys.executable, "-c", SLOW_OPERATOR, str(marker)],
            env={**env, "DSV3_OPERATOR_RESYNC_SECONDS": "0.3",
                 "DSV3_OPERATOR_CHECKPOINT_ADDRESS": "dsv3-checkpoint:50070"},
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        try:
            kubectl(env, "apply", "--validate=false", "-f", str(EXAMPLES / "training-debug.yaml"))
            wait_for("Created", lambda: "Created" in kubectl(env, "get", "dstj", "debug-run", "-o", "yaml"))
            # Two reconciles later the job is settled: the timer's reconciles change nothing any more.
            calls = marker.with_suffix(".calls")
            settled = len(calls.read_text()) + 2
            wait_for(
                "a settled timer reconcile in flight",
                lambda: len(calls.read_text()) >= settled and marker.exists(),
                timeout=20,
            )
            start = time.monotonic()
            kubectl(env, "delete", "dstj", "debug-run", "--wait=false")
            assert marker.exists()  # the delete went in while that reconcile was still running
            wait_for("job gone", lambda: "debug-run" not in kubectl(env, "get", "dstj"), timeout=15)
            took = time.monotonic() - start
            assert not kubectl(env, "get", "pods", "-l", "dsv3.dev/job=debug-run", "-o", "name").strip()
        finally:
            op.terminate()
            op.wait(timeout=20)
            log.close()
    assert took < 6, f"the delete took {took:.1f} s; operator log in {tmp_path / 'operator.log'}"
