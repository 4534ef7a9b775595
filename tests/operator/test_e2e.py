"""End to end against the KMock emulator (tests/operator/kube_emulator.py; not a cluster): the chart
installed with the real `helm install`, the real operator as a subprocess, jobs
applied, scaled and deleted with kubectl; pod phases are simulated by patching pod status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_emulator import kubeconfig, serve
from op_helpers import CHART, EXAMPLES, ROOT, kubectl, tool, wait_for

pytestmark = pytest.mark.timeout(180)

# The emulator serves no OpenAPI documents, so helm's client-side schema check is off; the rendered
# manifests are validated offline (kubernetes-validate --strict) in test_chart.py.
HELM_FLAGS = ("--disable-openapi-validation",)


class Cluster:
    def __init__(self, emulator: Any, env: dict[str, str]) -> None:
        self.emulator = emulator
        self.env = env

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        return kubectl(self.env, *args, stdin=stdin, check=check)

    def helm(self, *args: str) -> str:
        run = subprocess.run([tool("helm"), *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"helm {' '.join(args)}: {run.stdout}{run.stderr}"
        return run.stdout

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def pods(self, job: str) -> list[dict]:
        return self.get("pods", "-l", f"dsv3.dev/job={job}")["items"]

    def set_pod(self, name: str, phase: str, exit_code: int | None = None) -> None:
        status: dict[str, Any] = {"phase": phase}
        if exit_code is not None:
            term = {"exitCode": exit_code, "reason": "OOMKilled" if exit_code == 137 else "Error"}
            status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": term}}]
        self.kubectl(
            "patch", "pod", name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status})
        )

    def writes(self) -> int:
        return sum(1 for r in self.emulator._requests if r.method in ("POST", "PATCH", "PUT", "DELETE"))


def state(cluster: Cluster, kind: str, name: str) -> tuple[str, str, str]:
    conds = cluster.get(kind, name).get("status", {}).get("conditions") or [{}]
    c = conds[-1]
    return c.get("type", ""), c.get("reason", ""), c.get("message", "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    tmp: Path = tmp_path_factory.mktemp("kube")
    with serve() as (emulator, port):
        (tmp / "config").write_text(kubeconfig(port))
        env = {**os.environ, "KUBECONFIG": str(tmp / "config")}
        c = Cluster(emulator, env)
        c.helm("install", "dsv3", str(CHART), "-n", "default", *HELM_FLAGS)
        # The operator runs with the environment the chart gives its Deployment.
        deploy = c.get("deployment", "dsv3-operator")
        chart_env = {
            e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        chart_env.pop("DSV3_OPERATOR_LIVENESS")
        op_env = {
            **env,
            **chart_env,
            "DSV3_OPERATOR_RESYNC_SECONDS": "0.3",
            "DSV3_OPERATOR_STATUS_TIMEOUT_SECONDS": "0.2",
        }
        log = (tmp / "operator.log").open("w")
        op = subprocess.Popen(
            [sys.executable, "-m", "dsv3.operator"],
            env=op_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        c.operator_log = tmp / "operator.log"
        c.operator_pid = op.pid
        try:
            yield c
        finally:
            op.terminate()
            op.wait(timeout=20)
            log.close()


def test_helm_release_is_deployed_and_upgrades_in_place(cluster: Cluster) -> None:
    (release,) = json.loads(cluster.helm("list", "-n", "default", "-o", "json"))
    assert (release["name"], release["status"], release["revision"]) == ("dsv3", "deployed", "1")
    # helm stored its release record (a protobuf Secret the emulator decoded) where helm reads it back.
    secret = cluster.get("secret", "sh.helm.release.v1.dsv3.v1")
    assert secret["type"] == "helm.sh/release.v1" and secret["metadata"]["labels"]["status"] == "deployed"
    cluster.helm("upgrade", "dsv3", str(CHART), "-n", "default", "--reuse-values",
                 "--set", "checkpoint.keepLast=7", *HELM_FLAGS)  # fmt: skip
    history = json.loads(cluster.helm("history", "dsv3", "-n", "default", "-o", "json"))
    assert [(h["revision"], h["status"]) for h in history] == [(1, "superseded"), (2, "deployed")]
    container = cluster.get("deployment", "dsv3-checkpoint")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}["DSV3_KEEP_LAST"] == "7"


def test_chart_installs_crds_operator_and_services(cluster: Cluster) -> None:
    crds = {i["metadata"]["name"] for i in cluster.get("crd")["items"]}
    assert crds == {"deepseektrainingjobs.dsv3.dev", "deepseekservingjobs.dsv3.dev"}
    names = {i["metadata"]["name"] for i in cluster.get("deployments")["items"]}
    assert names == {"dsv3-operator", "dsv3-checkpoint", "dsv3-redis"}
    assert cluster.get("pvc", "dsv3-checkpoint")["spec"]["resources"]["requests"]["storage"] == "100Gi"


def test_running_operator_maps_no_libtorch(cluster: Cluster) -> None:
    wait_for(
        "operator up", lambda: "dsv3.operator" in Path(f"/proc/{cluster.operator_pid}/cmdline").read_text()
    )
    time.sleep(0.5)
    maps = Path(f"/proc/{cluster.operator_pid}/maps").read_text()
    assert ".so" in maps  # the maps were read: shared objects are listed
    assert "libtorch" not in maps


def test_training_job_runs_restarts_resumes_and_succeeds(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "training-debug.yaml"))
    job = cluster.get("dstj", "debug-run")
    pods = wait_for(
        "2 worker pods", lambda: len(cluster.pods("debug-run")) == 2 and cluster.pods("debug-run")
    )
    for pod in pods:
        ref = pod["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "DeepSeekTrainingJob", "debug-run", job["metadata"]["uid"], True,
        )  # fmt: skip
        c = pod["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["DSV3_CHECKPOINT"] == "dsv3-checkpoint.default.svc:50070"  # the chart's default
        assert env["DSV3_STEPS"] == "300" and env["DSV3_EP"] == "2"
        assert (
            "--rdzv-endpoint=debug-run-w0.debug-run-workers.default.svc.cluster.local:29400" in c["command"]
        )
        assert f"--rdzv-id=debug-run-{job['metadata']['uid'][:8]}-r0" in c["command"]
    assert cluster.get("service", "debug-run-workers")["spec"]["clusterIP"] == "None"
    wait_for("Created", lambda: state(cluster, "dstj", "debug-run")[0] == "Created")

    for pod in ("debug-run-w0-r0", "debug-run-w1-r0"):
        cluster.set_pod(pod, "Running")
    wait_for("Running", lambda: state(cluster, "dstj", "debug-run")[:2] == ("Running", "JobRunning"))
    table = cluster.kubectl("get", "dstj")
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "STATE", "STEP", "LOSS", "WORKERS", "AGE"]
    assert row.split()[:3] == ["debug-run", "Running", "2/2"]  # no step/loss yet: no trainer status RPC

    # A second reconcile of an unchanged job writes nothing (resync every 0.3 s).
    before = cluster.writes()
    time.sleep(1.5)
    assert cluster.writes() == before

    cluster.set_pod("debug-run-w1-r0", "Failed", exit_code=137)
    _, reason, message = wait_for(
        "Restarting", lambda: (s := state(cluster, "dstj", "debug-run"))[0] == "Restarting" and s
    )
    assert reason == "WorkerFailed"
    assert (
        "pod debug-run-w1-r0 (rank 1) failed with exit code 137 (OOMKilled)" in message and "(1/2)" in message
    )
    new = wait_for(
        "generation 1 pods",
        lambda: (
            sorted(p["metadata"]["name"] for p in cluster.pods("debug-run"))
            == ["debug-run-w0-r1", "debug-run-w1-r1"]
            and cluster.pods("debug-run")
        ),
    )
    assert all(
        f"--rdzv-id=debug-run-{job['metadata']['uid'][:8]}-r1" in p["spec"]["containers"][0]["command"]
        for p in new
    )
    assert cluster.get("dstj", "debug-run")["status"]["restarts"] == 1
    for pod in ("debug-run-w0-r1", "debug-run-w1-r1"):
        cluster.set_pod(pod, "Running")
    wait_for("resumed", lambda: state(cluster, "dstj", "debug-run")[:2] == ("Running", "JobResumed"))
    for pod in ("debug-run-w0-r1", "debug-run-w1-r1"):
        cluster.set_pod(pod, "Succeeded")
    wait_for("Succeeded", lambda: state(cluster, "dstj", "debug-run")[:2] == ("Succeeded", "JobSucceeded"))
    assert "completionTime" in cluster.get("dstj", "debug-run")["status"]

    cluster.kubectl("delete", "dstj", "debug-run", "--wait=false")
    wait_for(
        "children deleted",
        lambda: (
            not cluster.pods("debug-run")
            and not cluster.get("services", "-l", "dsv3.dev/job=debug-run")["items"]
        ),
    )
    wait_for("job gone", lambda: "debug-run" not in cluster.kubectl("get", "dstj"))


def test_invalid_spec_is_a_condition_and_creates_nothing(cluster: Cluster) -> None:
    # The emulator evaluates no CEL, so the rule reaches the operator, which must refuse it too.
    doc = yaml.safe_load((EXAMPLES / "invalid" / "training-bad-parallelism.yaml").read_text())
    cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(doc))
    kind, reason, message = wait_for(
        "InvalidSpec", lambda: (s := state(cluster, "dstj", "bad-parallel"))[0] and s
    )
    assert (kind, reason) == ("Failed", "InvalidSpec")
    assert message.startswith("spec.parallelism.expertParallel: 3 does not divide")
    time.sleep(0.7)
    assert cluster.pods("bad-parallel") == []
    assert cluster.get("services", "-l", "dsv3.dev/job=bad-parallel")["items"] == []
    # Fixing the spec clears the condition and the job starts.
    cluster.kubectl(
        "patch", "dstj", "bad-parallel", "--type=merge", "-p", '{"spec":{"parallelism":{"expertParallel":2}}}'
    )
    wait_for("pods after the fix", lambda: len(cluster.pods("bad-parallel")) == 2)
    wait_for("Created", lambda: state(cluster, "dstj", "bad-parallel")[:2] == ("Created", "JobCreated"))
    cluster.kubectl("delete", "dstj", "bad-parallel", "--wait=false")
    wait_for("children deleted", lambda: not cluster.pods("bad-parallel"))


def test_serving_job_scales_with_kubectl_scale(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "serving.yaml"))
    sts = wait_for("shard StatefulSet", lambda: cluster.get("statefulset", "debug-serve-shard"))
    assert sts["spec"]["replicas"] == 2
    router = wait_for("router", lambda: cluster.get("deployment", "debug-serve-router"))
    router = router["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in router["env"]}
    assert env["DSV3_SHARDS_DNS"] == "debug-serve-shards.default.svc.cluster.local:50090"
    assert (
        wait_for("shard service", lambda: cluster.get("service", "debug-serve-shards"))["spec"]["clusterIP"]
        == "None"
    )

    cluster.kubectl("scale", "dssj/debug-serve", "--replicas=5")
    wait_for("5 replicas", lambda: cluster.get("statefulset", "debug-serve-shard")["spec"]["replicas"] == 5)
    wait_for(
        "status follows", lambda: cluster.get("dssj", "debug-serve")["status"]["shards"]["replicas"] == 5
    )
    scale = json.loads(
        cluster.kubectl(
            "get", "--raw", "/apis/dsv3.dev/v1alpha1/namespaces/default/deepseekservingjobs/debug-serve/scale"
        )
    )
    assert (
        scale["spec"]["replicas"] == 5
        and scale["status"]["selector"] == "dsv3.dev/job=debug-serve,app.kubernetes.io/component=expert-shard"
    )
    header, row = cluster.kubectl("get", "dssj").splitlines()[:2]
    assert header.split() == ["NAME", "STATE", "SHARDS", "READY", "PLACEMENT", "BALANCE", "ENDPOINT", "AGE"]
    assert row.split()[:3] == ["debug-serve", "Progressing", "5"]
    assert "http://debug-serve-router.default.svc.cluster.local:8080" in row

    cluster.kubectl("delete", "dssj", "debug-serve", "--wait=false")
    wait_for(
        "children deleted",
        lambda: (
            not cluster.get("statefulsets", "-l", "dsv3.dev/job=debug-serve")["items"]
            and not cluster.get("deployments", "-l", "dsv3.dev/job=debug-serve")["items"]
            and not cluster.get("configmaps", "-l", "dsv3.dev/job=debug-serve")["items"]
        ),
    )


def test_suspend_deletes_workers_and_resume_starts_a_new_rendezvous(cluster: Cluster) -> None:
    doc = yaml.safe_load((EXAMPLES / "training-debug.yaml").read_text())
    doc["metadata"]["name"] = "pausable"
    cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(doc))
    wait_for("2 pods", lambda: len(cluster.pods("pausable")) == 2)
    suspend = '{"spec":{"runPolicy":{"suspend":%s}}}'
    cluster.kubectl("patch", "dstj", "pausable", "--type=merge", "-p", suspend % "true")
    wait_for("Suspended", lambda: state(cluster, "dstj", "pausable")[:2] == ("Suspended", "JobSuspended"))
    wait_for("no pods", lambda: cluster.pods("pausable") == [])
    cluster.kubectl("patch", "dstj", "pausable", "--type=merge", "-p", suspend % "false")
    new = ["pausable-w0-r1", "pausable-w1-r1"]
    wait_for("new pods", lambda: sorted(p["metadata"]["name"] for p in cluster.pods("pausable")) == new)
    assert state(cluster, "dstj", "pausable")[:2] == ("Created", "JobResumed")
    cluster.kubectl("delete", "dstj", "pausable", "--wait=false")
    wait_for("children deleted", lambda: not cluster.pods("pausable"))


def test_helm_uninstall_removes_the_release_and_what_it_installed(cluster: Cluster) -> None:
    """Last in this module: the chart's own objects go, and so does helm's release record."""
    cluster.helm("uninstall", "dsv3", "-n", "default")
    assert json.loads(cluster.helm("list", "-n", "default", "-o", "json")) == []
    names = {i["metadata"]["name"] for i in cluster.get("deployments")["items"]}
    assert not names & {"dsv3-operator", "dsv3-checkpoint", "dsv3-redis"}, names
    secrets = {i["metadata"]["name"] for i in cluster.get("secrets")["items"]}
    assert not any(s.startswith("sh.helm.release.v1.dsv3.") for s in secrets), secrets
