"""Pure functions: a parsed spec -> the manifests of a job's children (no API calls, tested as data).

Training: a headless Service (stable DNS for the rendezvous, published before readiness), one pod per
node (`<job>-w<rank>-r<restart>`, hostname `<job>-w<rank>`), and a ConfigMap for an inline model
config. Each restart is a new generation of pods with a fresh rendezvous id, so restarted workers never
try to rejoin a dead rendezvous. Serving: router Deployment + Service, expert-shard StatefulSet + its
headless Service (the router's --shards-dns), and a ConfigMap of the serving settings.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from dsv3.operator.config import OperatorConfig
from dsv3.operator.spec import GROUP, VERSION, Placement, ServingSpec, TrainingSpec

MANAGED_BY = "dsv3-operator"
JOB_LABEL = f"{GROUP}/job"
RESTART_LABEL = f"{GROUP}/restart"
RANK_LABEL = f"{GROUP}/rank"
COMPONENT_LABEL = "app.kubernetes.io/component"
MODEL_MOUNT = "/etc/dsv3/model"


@dataclasses.dataclass(frozen=True)
class Owner:
    """The custom resource that owns the children (its uid goes into their ownerReferences)."""

    kind: str
    name: str
    namespace: str
    uid: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """One child object: `body` is the Kubernetes object as sent to the API server."""

    api_version: str
    kind: str
    name: str
    body: dict[str, Any]


def _manifest(
    api_version: str, kind: str, owner: Owner, name: str, labels: dict[str, str], **rest: Any
) -> Manifest:
    meta = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels,
        "ownerReferences": [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": owner.kind,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    return Manifest(
        api_version, kind, name, {"apiVersion": api_version, "kind": kind, "metadata": meta, **rest}
    )


def _labels(owner: Owner, component: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dsv3",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        COMPONENT_LABEL: component,
        JOB_LABEL: owner.name,
        **extra,
    }


def _env(pairs: Mapping[str, object]) -> list[dict[str, str]]:
    out = []
    for k, v in pairs.items():
        text = str(v).lower() if isinstance(v, bool) else str(v)
        out.append({"name": k, "value": text})
    return out


def _placement(p: Placement) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.node_selector:
        out["nodeSelector"] = dict(p.node_selector)
    if p.tolerations:
        out["tolerations"] = [dict(t) for t in p.tolerations]
    return out


def _resources(gpu_name: str, gpu_count: int, cpu: object = None, memory: object = None) -> dict[str, Any]:
    req: dict[str, Any] = {}
    if cpu is not None:
        req["cpu"] = str(cpu)
    if memory is not None:
        req["memory"] = str(memory)
    limits = dict(req)
    if gpu_count:
        limits[gpu_name] = str(gpu_count)
    out: dict[str, Any] = {}
    if req:
        out["requests"] = req
    if limits:
        out["limits"] = limits
    return out


# ---- training -------------------------------------------------------------------------------------


def workers_service_name(job: str) -> str:
    return f"{job}-workers"


def worker_hostname(job: str, rank: int) -> str:
    return f"{job}-w{rank}"


def worker_pod_name(job: str, rank: int, restart: int) -> str:
    return f"{job}-w{rank}-r{restart}"


def worker_address(owner: Owner, rank: int, port: int, cfg: OperatorConfig) -> str:
    host = f"{worker_hostname(owner.name, rank)}.{workers_service_name(owner.name)}"
    return f"{host}.{owner.namespace}.svc.{cfg.cluster_domain}:{port}"


def checkpoint_job_id(namespace: str, name: str) -> str:
    """The checkpoint service's job id of a training job: `<namespace>.<name>`. Job ids there are
    `[A-Za-z0-9][A-Za-z0-9._-]*` (no '/'), and Kubernetes names never contain '.' in a namespace."""
    return f"{namespace}.{name}"


def serving_checkpoint_job(namespace: str, reference: str) -> str:
    """A serving job's `weights.checkpoint.job` (`name` of a training job in its namespace, or
    `namespace/name`) as the checkpoint service's job id."""
    other, _, name = reference.rpartition("/")
    return checkpoint_job_id(other or namespace, name)


def rendezvous_id(owner: Owner, restart: int) -> str:
    """Fresh per restart: a restarted group never meets the stale state of the previous one."""
    return f"{owner.name}-{owner.uid[:8]}-r{restart}"


def trainer_env(owner: Owner, spec: TrainingSpec, cfg: OperatorConfig) -> dict[str, object]:
    """The trainer's flags as their DSV3_* twins (the order is the trainer's --help order)."""
    if spec.model_flavour is not None:
        model: str = spec.model_flavour
    elif spec.model_config_map is not None:
        model = f"{MODEL_MOUNT}/{spec.model_config_map[1]}"
    else:
        model = f"{MODEL_MOUNT}/config.json"
    env: dict[str, object] = {
        "DSV3_MODEL": model,
        "DSV3_STEPS": spec.steps,
        "DSV3_BATCH": spec.batch,
        "DSV3_SEQ_LEN": spec.seq_len,
        "DSV3_LR": spec.lr,
        "DSV3_EP": spec.expert_parallel,
        "DSV3_SEED": spec.seed,
        "DSV3_DATA": spec.data_source,
        "DSV3_TOKENIZER": spec.tokenizer,
        "DSV3_OUTPUT_DIR": "/work/output",
        "DSV3_CHECKPOINT": spec.checkpoint_service,
        "DSV3_JOB": checkpoint_job_id(owner.namespace, owner.name),
        "DSV3_CHECKPOINT_INTERVAL": spec.checkpoint_interval,
        "DSV3_KEEP_LAST": spec.keep_last,
        "DSV3_EXPORT": spec.export,
        "DSV3_STATUS_PORT": cfg.status_port,
        "DSV3_FP8": spec.fp8,
        "DSV3_RESUME_FROM": spec.resume_from,
    }
    if cfg.otel_endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = cfg.otel_endpoint
        env["OTEL_SERVICE_NAME"] = "dsv3-trainer"
    for k, v in spec.env:
        env[k] = v
    return env


def torchrun_args(owner: Owner, spec: TrainingSpec, restart: int, cfg: OperatorConfig) -> list[str]:
    return [
        "torchrun",
        f"--nnodes={spec.nodes}",
        f"--nproc-per-node={spec.procs_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={worker_address(owner, 0, cfg.rdzv_port, cfg)}",
        f"--rdzv-id={rendezvous_id(owner, restart)}",
        "--max-restarts=0",  # the operator restarts the whole group, with a new rendezvous
        "-m",
        "dsv3.trainer",
    ]


def render_training(owner: Owner, spec: TrainingSpec, restart: int, cfg: OperatorConfig) -> list[Manifest]:
    """Children of one training generation: the Service, the model ConfigMap (inline config), the pods."""
    out = [
        _manifest(
            "v1",
            "Service",
            owner,
            workers_service_name(owner.name),
            _labels(owner, "trainer"),
            spec={
                "clusterIP": "None",
                "publishNotReadyAddresses": True,  # rendezvous happens before any pod is ready
                "selector": {JOB_LABEL: owner.name, COMPONENT_LABEL: "trainer"},
                "ports": [
                    {"name": "rdzv", "port": cfg.rdzv_port, "targetPort": cfg.rdzv_port},
                    {"name": "status", "port": cfg.status_port, "targetPort": cfg.status_port},
                ],
            },
        )
    ]
    volumes: list[dict[str, Any]] = [{"name": "output", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "output", "mountPath": "/work/output"}]
    if spec.model_config is not None:
        out.append(
            _manifest(
                "v1",
                "ConfigMap",
                owner,
                f"{owner.name}-model",
                _labels(owner, "trainer"),
                data={"config.json": json.dumps(spec.model_config, sort_keys=True, indent=1)},
            )
        )
        volumes.append({"name": "model", "configMap": {"name": f"{owner.name}-model"}})
    elif spec.model_config_map is not None:
        volumes.append({"name": "model", "configMap": {"name": spec.model_config_map[0]}})
    if len(volumes) > 1:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    if spec.data_claim:
        volumes.append(
            {"name": "data", "persistentVolumeClaim": {"claimName": spec.data_claim, "readOnly": True}}
        )
        mounts.append({"name": "data", "mountPath": "/data", "readOnly": True})
    env = _env(trainer_env(owner, spec, cfg))
    args = torchrun_args(owner, spec, restart, cfg)
    for rank in range(spec.nodes):
        labels = _labels(owner, "trainer", **{RESTART_LABEL: str(restart), RANK_LABEL: str(rank)})
        container = {
            "name": "trainer",
            "image": spec.image,
            "imagePullPolicy": spec.image_pull_policy,
            "command": args,
            "env": [*env, {"name": "DSV3_NODE_RANK", "value": str(rank)}],
            "ports": [
                {"name": "rdzv", "containerPort": cfg.rdzv_port},
                {"name": "status", "containerPort": cfg.status_port},
            ],
            "volumeMounts": mounts,
            "resources": _resources(spec.gpu.resource_name, spec.gpu.count, spec.cpu, spec.memory),
        }
        pod_spec: dict[str, Any] = {
            "restartPolicy": "Never",  # the operator restarts the group, never a lone worker
            "hostname": worker_hostname(owner.name, rank),
            "subdomain": workers_service_name(owner.name),
            "containers": [container],
            "volumes": volumes,
            **_placement(spec.placement),
        }
        out.append(
            _manifest("v1", "Pod", owner, worker_pod_name(owner.name, rank, restart), labels, spec=pod_spec)
        )
    return out


# ---- serving --------------------------------------------------------------------------------------


def shards_service_name(job: str) -> str:
    return f"{job}-shards"


def router_name(job: str) -> str:
    return f"{job}-router"


def shard_selector(job: str) -> str:
    """The scale subresource's labelSelectorPath value (a string, as an HPA needs)."""
    return f"{JOB_LABEL}={job},{COMPONENT_LABEL}=expert-shard"


def serving_endpoints(owner: Owner, spec: ServingSpec, cfg: OperatorConfig) -> dict[str, str]:
    host = f"{router_name(owner.name)}.{owner.namespace}.svc.{cfg.cluster_domain}"
    return {"grpc": f"{host}:{spec.router_port}", "http": f"http://{host}:{spec.router_http_port}"}


def _pod_template(
    labels: dict[str, str], container: dict[str, Any], spec: ServingSpec, volumes: list
) -> dict:
    return {
        "metadata": {"labels": labels},
        "spec": {"containers": [container], "volumes": volumes, **_placement(spec.placement)},
    }


def render_serving(owner: Owner, spec: ServingSpec, cfg: OperatorConfig) -> list[Manifest]:
    """Children of a serving job; only StatefulSet.spec.replicas changes when the job is scaled."""
    device = "cuda" if spec.shard_gpu.count else "cpu"
    settings: dict[str, object] = {"DSV3_DEVICE": device}
    if spec.redis_url:
        settings["DSV3_REDIS_URL"] = spec.redis_url
    if cfg.otel_endpoint:
        settings["OTEL_EXPORTER_OTLP_ENDPOINT"] = cfg.otel_endpoint
    if spec.checkpoint_service:
        settings["DSV3_CHECKPOINT"] = spec.checkpoint_service
    cm_name = f"{owner.name}-serving"
    cm = _manifest("v1", "ConfigMap", owner, cm_name, _labels(owner, "serving"), data=_strs(settings))
    env_from = [{"configMapRef": {"name": cm_name}}]

    shard_labels = _labels(owner, "expert-shard")
    shard_select = {JOB_LABEL: owner.name, COMPONENT_LABEL: "expert-shard"}
    shards_dns = shards_service_name(owner.name)
    shard_container = {
        "name": "expert-shard",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["dsv3-expert-shard"],
        "envFrom": env_from,
        "env": _env({"DSV3_PORT": spec.shard_port, "DSV3_CAPACITY": spec.shard_capacity}),
        "ports": [{"name": "grpc", "containerPort": spec.shard_port}],
        "resources": {
            **spec.shard_resources,
            **_resources(spec.shard_gpu.resource_name, spec.shard_gpu.count),
        },
    }
    sts = _manifest(
        "apps/v1",
        "StatefulSet",
        owner,
        f"{owner.name}-shard",
        shard_labels,
        spec={
            "replicas": spec.shard_replicas,
            "serviceName": shards_dns,
            "podManagementPolicy": "Parallel",  # shards are peers: scale by N at once
            "selector": {"matchLabels": shard_select},
            "template": _pod_template(shard_labels, shard_container, spec, []),
        },
    )
    shard_svc = _manifest(
        "v1",
        "Service",
        owner,
        shards_dns,
        shard_labels,
        spec={
            "clusterIP": "None",
            "selector": shard_select,
            "ports": [{"name": "grpc", "port": spec.shard_port, "targetPort": spec.shard_port}],
        },
    )

    router_env: dict[str, object] = {
        "DSV3_PORT": spec.router_port,
        "DSV3_HTTP_PORT": spec.router_http_port,
        "DSV3_SHARDS_DNS": f"{shards_dns}.{owner.namespace}.svc.{cfg.cluster_domain}:{spec.shard_port}",
        "DSV3_REPLICAS": spec.expert_replicas,
        "DSV3_REBALANCE_INTERVAL": spec.rebalance_interval_seconds,
    }
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if spec.model_dir is not None:
        router_env["DSV3_MODEL_DIR"] = spec.model_dir
        if spec.model_claim:
            volumes.append(
                {"name": "model", "persistentVolumeClaim": {"claimName": spec.model_claim, "readOnly": True}}
            )
            mounts.append({"name": "model", "mountPath": spec.model_dir, "readOnly": True})
    else:
        router_env["DSV3_JOB"] = serving_checkpoint_job(owner.namespace, spec.checkpoint_job or "")
        if spec.checkpoint_step is not None:
            router_env["DSV3_STEP"] = spec.checkpoint_step
    router_labels = _labels(owner, "router")
    router_select = {JOB_LABEL: owner.name, COMPONENT_LABEL: "router"}
    router_container = {
        "name": "router",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["dsv3-router"],
        "envFrom": env_from,
        "env": _env(router_env),
        "ports": [
            {"name": "grpc", "containerPort": spec.router_port},
            {"name": "http", "containerPort": spec.router_http_port},
        ],
        "volumeMounts": mounts,
        "resources": dict(spec.router_resources),
    }
    deploy = _manifest(
        "apps/v1",
        "Deployment",
        owner,
        router_name(owner.name),
        router_labels,
        spec={
            "replicas": spec.router_replicas,
            "selector": {"matchLabels": router_select},
            "template": _pod_template(router_labels, router_container, spec, volumes),
        },
    )
    router_svc = _manifest(
        "v1",
        "Service",
        owner,
        router_name(owner.name),
        router_labels,
        spec={
            "selector": router_select,
            "ports": [
                {"name": "grpc", "port": spec.router_port, "targetPort": spec.router_port},
                {"name": "http", "port": spec.router_http_port, "targetPort": spec.router_http_port},
            ],
        },
    )
    return [cm, shard_svc, sts, router_svc, deploy]


def _strs(d: Mapping[str, object]) -> dict[str, str]:
    return {k: str(v) for k, v in d.items()}
