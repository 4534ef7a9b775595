"""Rendering is pure: a spec in, manifests out; checked as data."""

from __future__ import annotations

import json

import pytest
from op_helpers import EXAMPLES, load

from dsv3.operator.config import OperatorConfig
from dsv3.operator.render import Owner, render_serving, render_training, shard_selector
from dsv3.operator.spec import SpecError, parse_serving, parse_training

CFG = OperatorConfig(checkpoint_address="dsv3-checkpoint.dsv3.svc:50070", otel_endpoint="http://otel:4317")
OWNER = Owner("DeepSeekTrainingJob", "debug-run", "team", "0123456789abcdef")


def _training(**over):
    spec = load(EXAMPLES / "training-debug.yaml")["spec"]
    spec.update(over)
    return parse_training(spec, CFG.checkpoint_address)


def _by_kind(manifests):
    out: dict[str, list] = {}
    for m in manifests:
        out.setdefault(m.kind, []).append(m)
    return out


def _env(container) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_training_renders_a_headless_service_and_one_pod_per_node_with_owner_refs() -> None:
    kinds = _by_kind(render_training(OWNER, _training(), 0, CFG))
    assert sorted(kinds) == ["Pod", "Service"]
    svc = kinds["Service"][0].body
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    pods = [m.body for m in kinds["Pod"]]
    assert [p["metadata"]["name"] for p in pods] == ["debug-run-w0-r0", "debug-run-w1-r0"]
    for rank, pod in enumerate(pods):
        ref = pod["metadata"]["ownerReferences"][0]
        assert ref == {
            "apiVersion": "dsv3.dev/v1alpha1",
            "kind": "DeepSeekTrainingJob",
            "name": "debug-run",
            "uid": OWNER.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert pod["spec"]["hostname"] == f"debug-run-w{rank}"
        assert pod["spec"]["subdomain"] == svc["metadata"]["name"]
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["metadata"]["labels"]["dsv3.dev/rank"] == str(rank)


def test_training_pods_carry_the_rendezvous_and_the_trainer_flags() -> None:
    pod = render_training(OWNER, _training(), 2, CFG)[1].body
    c = pod["spec"]["containers"][0]
    assert c["command"] == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=debug-run-w0.debug-run-workers.team.svc.cluster.local:29400",
        "--rdzv-id=debug-run-01234567-r2",
        "--max-restarts=0",
        "-m",
        "dsv3.trainer",
    ]
    env = _env(c)
    assert env["DSV3_MODEL"] == "debug"
    assert env["DSV3_STEPS"] == "300" and env["DSV3_SEQ_LEN"] == "128" and env["DSV3_EP"] == "2"
    assert env["DSV3_CHECKPOINT"] == "dsv3-checkpoint.dsv3.svc:50070"
    assert env["DSV3_JOB"] == "team.debug-run"  # the checkpoint service refuses "/" in job ids
    assert env["DSV3_CHECKPOINT_INTERVAL"] == "50" and env["DSV3_KEEP_LAST"] == "3"
    assert env["DSV3_FP8"] == "false" and env["DSV3_STATUS_PORT"] == "50060"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4317"


def test_a_restart_renders_new_pod_names_and_a_fresh_rendezvous_id() -> None:
    a = render_training(OWNER, _training(), 0, CFG)
    b = render_training(OWNER, _training(), 1, CFG)
    assert {m.name for m in a if m.kind == "Pod"}.isdisjoint({m.name for m in b if m.kind == "Pod"})
    assert a[0] == b[0]  # the Service is the same object across restarts
    assert a[1].body["spec"]["containers"][0]["command"] != b[1].body["spec"]["containers"][0]["command"]


def test_gpu_resources_node_selector_tolerations_and_inline_model_config() -> None:
    spec = load(EXAMPLES / "training-gpu.yaml")["spec"]
    spec["model"] = {"config": {"hidden_size": 64, "n_routed_experts": 8}}
    out = _by_kind(render_training(OWNER, parse_training(spec, "ck:1"), 0, CFG))
    cm = out["ConfigMap"][0].body
    assert json.loads(cm["data"]["config.json"]) == {"hidden_size": 64, "n_routed_experts": 8}
    pod = out["Pod"][0].body
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert c["resources"]["requests"] == {"cpu": "64", "memory": "900Gi"}
    assert _env(c)["DSV3_MODEL"] == "/etc/dsv3/model/config.json"
    assert {"name": "model", "configMap": {"name": "debug-run-model"}} in pod["spec"]["volumes"]
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert len(out["Pod"]) == 4


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        (
            {"parallelism": {"nodes": 2, "procsPerNode": 2, "expertParallel": 3}},
            "spec.parallelism.expertParallel",
        ),
        (
            {"parallelism": {"nodes": 2, "expertParallel": 2, "dataParallel": 2}},
            "spec.parallelism.dataParallel",
        ),
        ({"training": {"steps": 0}}, "spec.training.steps"),
        ({"training": {"steps": 5, "lr": -1}}, "spec.training.lr"),
        ({"model": {"flavour": "debug", "configMap": {"name": "x"}}}, "spec.model"),
        ({"runPolicy": {"restartPolicy": "Sometimes"}}, "spec.runPolicy.restartPolicy"),
        (
            {"resources": {"gpu": {"count": 1}}, "parallelism": {"procsPerNode": 2}},
            "spec.resources.gpu.count",
        ),
    ],
)
def test_bad_training_specs_name_the_field(patch, field) -> None:
    with pytest.raises(SpecError) as err:
        _training(**patch)
    assert err.value.field == field


def test_missing_checkpoint_service_is_an_error_without_an_operator_default() -> None:
    spec = load(EXAMPLES / "training-debug.yaml")["spec"]
    with pytest.raises(SpecError, match=r"spec\.checkpoint\.service"):
        parse_training(spec, "")


def test_serving_renders_router_and_shard_statefulset_wired_by_dns() -> None:
    owner = Owner("DeepSeekServingJob", "debug-serve", "team", "feedbeef00")
    spec = parse_serving(load(EXAMPLES / "serving.yaml")["spec"], CFG.checkpoint_address, "redis://r:6379")
    out = {(m.kind, m.name): m.body for m in render_serving(owner, spec, CFG)}
    sts = out["StatefulSet", "debug-serve-shard"]
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == "debug-serve-shards"
    assert out["Service", "debug-serve-shards"]["spec"]["clusterIP"] == "None"
    sel = sts["spec"]["selector"]["matchLabels"]
    assert sel.items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert shard_selector("debug-serve") == ",".join(f"{k}={v}" for k, v in sel.items())
    router = out["Deployment", "debug-serve-router"]["spec"]["template"]["spec"]["containers"][0]
    env = _env(router)
    assert env["DSV3_SHARDS_DNS"] == "debug-serve-shards.team.svc.cluster.local:50090"
    assert env["DSV3_JOB"] == "default.debug-run" and "DSV3_STEP" not in env
    settings = out["ConfigMap", "debug-serve-serving"]["data"]
    assert settings["DSV3_REDIS_URL"] == "redis://r:6379" and settings["DSV3_DEVICE"] == "cpu"
    assert settings["DSV3_CHECKPOINT"] == CFG.checkpoint_address
    assert {p["port"] for p in out["Service", "debug-serve-router"]["spec"]["ports"]} == {50080, 8080}
    shard = sts["spec"]["template"]["spec"]["containers"][0]
    assert _env(shard) == {"DSV3_PORT": "50090", "DSV3_CAPACITY": "64"}


def test_the_operator_default_gpu_resource_applies_when_the_spec_names_none() -> None:
    spec = load(EXAMPLES / "training-debug.yaml")["spec"]
    spec["resources"] = {"gpu": {"count": 1}}
    pod = render_training(OWNER, parse_training(spec, "ck:1", "amd.com/gpu"), 0, CFG)[1].body
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"amd.com/gpu": "1"}
