"""The chart with the real helm binary: lint, template, strict schema checks of what it renders."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from op_helpers import CHART, CRDS, load, tool


def _helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([tool("helm"), *args], capture_output=True, text=True)
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def _render(*sets: str) -> list[dict]:
    flags = [f for s in sets for f in ("--set", s)]
    out = _helm("template", "rel", str(CHART), "-n", "dsv3", *flags).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_lint_strict() -> None:
    assert "0 chart(s) failed" in _helm("lint", "--strict", str(CHART)).stdout


def test_rendered_manifests_pass_kubernetes_validate_strict(tmp_path) -> None:
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(_render("otel.endpoint=http://otel:4317", "nodeSelector.pool=cpu")))
    run = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.33.0", str(path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("passed") == 11


def test_chart_installs_the_pieces_and_wires_the_operator() -> None:
    docs = _render()
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == [
        "ClusterRole/rel-operator",
        "ClusterRoleBinding/rel-operator",
        "CustomResourceDefinition/deepseekservingjobs.dsv3.dev",
        "CustomResourceDefinition/deepseektrainingjobs.dsv3.dev",
        "Deployment/rel-checkpoint",
        "Deployment/rel-operator",
        "Deployment/rel-redis",
        "PersistentVolumeClaim/rel-checkpoint",
        "Service/rel-checkpoint",
        "Service/rel-redis",
        "ServiceAccount/rel-operator",
    ]
    crds = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert crds["deepseektrainingjobs.dsv3.dev"] == load(
        CRDS / "deepseektrainingjobs.yaml"
    )  # same as the file
    op = next(d for d in docs if d["metadata"]["name"] == "rel-operator" and d["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in op["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DSV3_OPERATOR_CHECKPOINT_ADDRESS"] == "rel-checkpoint.dsv3.svc:50070"
    assert env["DSV3_OPERATOR_REDIS_URL"] == "redis://rel-redis.dsv3.svc:6379/0"


def test_rbac_is_least_privilege() -> None:
    role = next(d for d in _render() if d["kind"] == "ClusterRole")
    granted = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert not any("*" in x for t in granted for x in t)
    jobs = {"deepseektrainingjobs", "deepseekservingjobs"}
    children = {"pods", "services", "configmaps", "statefulsets", "deployments"}
    assert {r for _, r, _ in granted} == jobs | {f"{j}/status" for j in jobs} | children
    assert ("", "secrets", "get") not in granted
    assert (
        "dsv3.dev",
        "deepseektrainingjobs",
        "create",
    ) not in granted  # users create jobs, not the operator


def test_values_flags_switch_parts_off() -> None:
    docs = _render(
        "crds.install=false", "checkpoint.enabled=false", "redis.enabled=false", "redis.url=redis://x:1"
    )
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"}
    crds = [d for d in _render("crds.keep=false") if d["kind"] == "CustomResourceDefinition"]
    assert all("annotations" not in d["metadata"] for d in crds)


@pytest.mark.parametrize(
    ("flag", "needle"),
    [("operator.bogus=1", "bogus"), ("gpu.resourceName=gpus", "resourceName"), ("checkpoint.port=0", "port")],
)
def test_strict_values_schema_refuses_bad_values(flag, needle) -> None:
    run = _helm("template", "rel", str(CHART), "--set", flag, check=False)
    assert run.returncode != 0 and needle in run.stderr


def test_every_value_is_documented() -> None:
    """Each key has a `# --` comment right above it, except the keys inside a `resources:` block."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#") or ":" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        parents = [x for x in lines[:i] if x.strip() and not x.lstrip().startswith("#")]
        parent = next((x for x in reversed(parents) if len(x) - len(x.lstrip()) < indent), "")
        if parent.strip() == "resources:":
            continue
        assert lines[i - 1].lstrip().startswith("# "), f"values.yaml:{i + 1}: {line.strip()} has no comment"


def test_grafana_dashboard_configmap_queries_metrics_the_services_export() -> None:
    import json
    import re

    assert not [d for d in _render() if d["kind"] == "ConfigMap" and "grafana" in d["metadata"]["name"]]
    (cm,) = [d for d in _render("grafana.dashboard.enabled=true") if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].endswith("grafana-dashboard")]  # fmt: skip
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["dsv3-dashboard.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 10 and all(exprs)
    sources = "".join(p.read_text() for p in (CHART.parents[1] / "services").rglob("src/**/*.py"))
    for name in {m for e in exprs for m in re.findall(r"dsv3_[a-z_]+", e)}:
        stem = re.sub(r"_(total|bucket)$", "", name)
        stem = stem.removesuffix("_seconds") if f'"{stem}"' not in sources else stem  # OTel appends the unit
        assert f'"{stem}"' in sources, f"the dashboard queries {name}, which no service exports"
