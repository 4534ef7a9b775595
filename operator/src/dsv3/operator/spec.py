"""Typed, validated specs of the two custom resources.

The CRD schema refuses most bad input at the API server; this module checks the same rules again (an
API server without CEL, or an object written around the schema, must not produce broken pods) and
names the offending field in the error, which the handlers report as an InvalidSpec condition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

GROUP = "dsv3.dev"
VERSION = "v1alpha1"
MAX_NAME = 40
FLAVOURS = ("debug", "16b", "671b")


class SpecError(ValueError):
    """A spec field is missing or wrong; `field` is its dotted path (e.g. spec.parallelism.nodes)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _int(obj: Mapping[str, Any], path: str, key: str, default: int | None, minimum: int = 0) -> int:
    value = obj.get(key, default)
    field = f"{path}.{key}"
    if value is None:
        raise SpecError(field, "is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(field, f"must be >= {minimum}, got {value}")
    return value


def _str(obj: Mapping[str, Any], path: str, key: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if value is None:
        raise SpecError(f"{path}.{key}", "is required")
    if not isinstance(value, str):
        raise SpecError(f"{path}.{key}", f"must be a string, got {value!r}")
    return value


def _map(obj: Mapping[str, Any], path: str, key: str) -> Mapping[str, Any]:
    value = obj.get(key) or {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{path}.{key}", "must be an object")
    return value


def _choice(obj: Mapping[str, Any], path: str, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = _str(obj, path, key, default)
    if value not in allowed:
        raise SpecError(f"{path}.{key}", f"must be one of {', '.join(allowed)}, got {value!r}")
    return value


def check_name(name: str) -> None:
    if len(name) > MAX_NAME:
        raise SpecError("metadata.name", f"must be at most {MAX_NAME} characters, got {len(name)}")


@dataclasses.dataclass(frozen=True)
class Gpu:
    resource_name: str = "nvidia.com/gpu"
    count: int = 0


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where pods may run: shared by both kinds."""

    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[Mapping[str, Any], ...] = ()


def _gpu(obj: Mapping[str, Any], path: str, default_name: str) -> Gpu:
    g = _map(obj, path, "gpu")
    return Gpu(_str(g, f"{path}.gpu", "resourceName", "") or default_name, _int(g, f"{path}.gpu", "count", 0))


def _placement(spec: Mapping[str, Any]) -> Placement:
    sel = _map(spec, "spec", "nodeSelector")
    for k, v in sel.items():
        if not isinstance(v, str):
            raise SpecError(f"spec.nodeSelector.{k}", "must be a string")
    tol = spec.get("tolerations") or []
    if not isinstance(tol, list) or not all(isinstance(t, Mapping) for t in tol):
        raise SpecError("spec.tolerations", "must be a list of objects")
    return Placement(tuple(sorted(sel.items())), tuple(tol))


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    image: str
    image_pull_policy: str
    model_flavour: str | None
    model_config: Mapping[str, Any] | None
    model_config_map: tuple[str, str] | None  # (name, key)
    data_source: str
    tokenizer: str
    data_claim: str | None
    steps: int
    batch: int
    seq_len: int
    lr: float
    seed: int
    fp8: bool
    export: bool
    nodes: int
    procs_per_node: int
    expert_parallel: int
    gpu: Gpu
    cpu: str | int | None
    memory: str | int | None
    placement: Placement
    env: tuple[tuple[str, str], ...]
    checkpoint_service: str
    checkpoint_interval: int
    keep_last: int
    resume_from: str
    backoff_limit: int
    active_deadline_seconds: int | None
    ttl_seconds_after_finished: int | None
    clean_pod_policy: str
    restart_policy: str
    suspend: bool

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.expert_parallel


def parse_training(
    spec: Mapping[str, Any], default_checkpoint: str = "", default_gpu: str = "nvidia.com/gpu"
) -> TrainingSpec:
    """Validate a DeepSeekTrainingJob spec (defaults as in the CRD) or raise SpecError naming the field."""
    image = _str(spec, "spec", "image")
    if not image:
        raise SpecError("spec.image", "must not be empty")
    model = spec.get("model") or {"flavour": "debug"}
    chosen = [k for k in ("flavour", "config", "configMap") if model.get(k) is not None]
    if len(chosen) != 1:
        raise SpecError(
            "spec.model", f"set exactly one of flavour, config, configMap (got {chosen or 'none'})"
        )
    flavour = _choice(model, "spec.model", "flavour", "debug", FLAVOURS) if "flavour" in chosen else None
    config = _map(model, "spec.model", "config") if "config" in chosen else None
    cmap = None
    if "configMap" in chosen:
        cm = _map(model, "spec.model", "configMap")
        cmap = (
            _str(cm, "spec.model.configMap", "name"),
            _str(cm, "spec.model.configMap", "key", "config.json"),
        )
    data = _map(spec, "spec", "data")
    tr = spec.get("training")
    if not isinstance(tr, Mapping):
        raise SpecError("spec.training", "is required (at least training.steps)")
    lr = tr.get("lr", 3e-4)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0:
        raise SpecError("spec.training.lr", f"must be a number > 0, got {lr!r}")
    par = _map(spec, "spec", "parallelism")
    p = "spec.parallelism"
    nodes = _int(par, p, "nodes", 1, 1)
    ppn = _int(par, p, "procsPerNode", 1, 1)
    ep = _int(par, p, "expertParallel", 1, 1)
    if (nodes * ppn) % ep:
        raise SpecError(
            f"{p}.expertParallel", f"{ep} does not divide the world size nodes*procsPerNode = {nodes * ppn}"
        )
    if par.get("dataParallel") is not None and _int(par, p, "dataParallel", None, 1) * ep != nodes * ppn:
        raise SpecError(
            f"{p}.dataParallel",
            f"dataParallel*expertParallel = {par['dataParallel']}*{ep} != nodes*procsPerNode = {nodes * ppn}",
        )
    res = _map(spec, "spec", "resources")
    gpu = _gpu(res, "spec.resources", default_gpu)
    if gpu.count and gpu.count < ppn:
        raise SpecError("spec.resources.gpu.count", f"{gpu.count} GPUs cannot hold procsPerNode = {ppn}")
    env = spec.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, Mapping) and e.get("name") for e in env):
        raise SpecError("spec.env", "must be a list of {name, value}")
    ck = _map(spec, "spec", "checkpoint")
    service = _str(ck, "spec.checkpoint", "service", "") or default_checkpoint
    if not service:
        raise SpecError(
            "spec.checkpoint.service", "is empty and the operator has no default checkpoint service"
        )
    rp = _map(spec, "spec", "runPolicy")
    r = "spec.runPolicy"
    deadline = rp.get("activeDeadlineSeconds")
    ttl = rp.get("ttlSecondsAfterFinished")
    return TrainingSpec(
        image=image,
        image_pull_policy=_choice(
            spec, "spec", "imagePullPolicy", "IfNotPresent", ("Always", "IfNotPresent", "Never")
        ),
        model_flavour=flavour,
        model_config=config,
        model_config_map=cmap,
        data_source=_str(data, "spec.data", "source", ""),
        tokenizer=_str(data, "spec.data", "tokenizer", "byte"),
        data_claim=data.get("claimName") or None,
        steps=_int(tr, "spec.training", "steps", None, 1),
        batch=_int(tr, "spec.training", "batch", 8, 1),
        seq_len=_int(tr, "spec.training", "seqLen", 256, 1),
        lr=float(lr),
        seed=_int(tr, "spec.training", "seed", 0),
        fp8=bool(tr.get("fp8", False)),
        export=bool(tr.get("export", False)),
        nodes=nodes,
        procs_per_node=ppn,
        expert_parallel=ep,
        gpu=gpu,
        cpu=res.get("cpu"),
        memory=res.get("memory"),
        placement=_placement(spec),
        env=tuple((str(e["name"]), str(e.get("value", ""))) for e in env),
        checkpoint_service=service,
        checkpoint_interval=_int(ck, "spec.checkpoint", "interval", 100, 1),
        keep_last=_int(ck, "spec.checkpoint", "keepLast", 3),
        resume_from=_choice(ck, "spec.checkpoint", "resumeFrom", "latest", ("latest", "none")),
        backoff_limit=_int(rp, r, "backoffLimit", 3),
        active_deadline_seconds=None if deadline is None else _int(rp, r, "activeDeadlineSeconds", None, 1),
        ttl_seconds_after_finished=None if ttl is None else _int(rp, r, "ttlSecondsAfterFinished", None),
        clean_pod_policy=_choice(rp, r, "cleanPodPolicy", "Running", ("All", "Running", "None")),
        restart_policy=_choice(rp, r, "restartPolicy", "OnFailure", ("OnFailure", "ExitCode", "Never")),
        suspend=bool(rp.get("suspend", False)),
    )


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    image: str
    image_pull_policy: str
    checkpoint_job: str | None
    checkpoint_step: int | None
    checkpoint_service: str
    model_dir: str | None
    model_claim: str | None
    router_replicas: int
    router_port: int
    router_http_port: int
    expert_replicas: int
    router_resources: Mapping[str, Any]
    shard_replicas: int
    shard_capacity: int
    shard_port: int
    shard_gpu: Gpu
    shard_resources: Mapping[str, Any]
    rebalance_interval_seconds: int
    redis_url: str
    placement: Placement


def parse_serving(
    spec: Mapping[str, Any],
    default_checkpoint: str = "",
    default_redis: str = "",
    default_gpu: str = "nvidia.com/gpu",
) -> ServingSpec:
    """Validate a DeepSeekServingJob spec or raise SpecError naming the field."""
    image = _str(spec, "spec", "image")
    if not image:
        raise SpecError("spec.image", "must not be empty")
    weights = _map(spec, "spec", "weights")
    if ("checkpoint" in weights) == ("modelDir" in weights):
        raise SpecError("spec.weights", "set exactly one of checkpoint, modelDir")
    job = step = model_dir = claim = None
    service = ""
    if "checkpoint" in weights:
        ck = _map(weights, "spec.weights", "checkpoint")
        job = _str(ck, "spec.weights.checkpoint", "job")
        step = None if ck.get("step") is None else _int(ck, "spec.weights.checkpoint", "step", None)
        service = _str(ck, "spec.weights.checkpoint", "service", "") or default_checkpoint
        if not service:
            raise SpecError(
                "spec.weights.checkpoint.service",
                "is empty and the operator has no default checkpoint service",
            )
    else:
        md = _map(weights, "spec.weights", "modelDir")
        model_dir = _str(md, "spec.weights.modelDir", "path")
        claim = md.get("claimName") or None
    router = _map(spec, "spec", "router")
    shards = _map(spec, "spec", "shards")
    ports = {}
    for path, obj, key, default in (
        ("spec.router", router, "port", 50080),
        ("spec.router", router, "httpPort", 8080),
        ("spec.shards", shards, "port", 50090),
    ):
        ports[f"{path}.{key}"] = _int(obj, path, key, default, 1)
        if ports[f"{path}.{key}"] > 65535:
            raise SpecError(f"{path}.{key}", "must be <= 65535")
    return ServingSpec(
        image=image,
        image_pull_policy=_choice(
            spec, "spec", "imagePullPolicy", "IfNotPresent", ("Always", "IfNotPresent", "Never")
        ),
        checkpoint_job=job,
        checkpoint_step=step,
        checkpoint_service=service,
        model_dir=model_dir,
        model_claim=claim,
        router_replicas=_int(router, "spec.router", "replicas", 1, 1),
        router_port=ports["spec.router.port"],
        router_http_port=ports["spec.router.httpPort"],
        expert_replicas=_int(router, "spec.router", "expertReplicas", 0),
        router_resources=_map(router, "spec.router", "resources"),
        shard_replicas=_int(shards, "spec.shards", "replicas", 2),
        shard_capacity=_int(shards, "spec.shards", "capacity", 64, 1),
        shard_port=ports["spec.shards.port"],
        shard_gpu=_gpu(shards, "spec.shards", default_gpu),
        shard_resources=_map(shards, "spec.shards", "resources"),
        rebalance_interval_seconds=_int(spec, "spec", "rebalanceIntervalSeconds", 300),
        redis_url=_str(spec, "spec", "redisUrl", "") or default_redis,
        placement=_placement(spec),
    )
