"""Kopf handlers: each reconcile reads the children, asks `lifecycle.decide` / `render` what they
should be, creates or patches only what differs, and patches only the status fields that changed."""

from __future__ import annotations

import collections
import datetime
import threading
from collections.abc import Mapping
from typing import Any

import kopf

from dsv3.operator import conditions as cond
from dsv3.operator.config import OperatorConfig
from dsv3.operator.kube import Kube
from dsv3.operator.lifecycle import PodView, decide
from dsv3.operator.render import (
    COMPONENT_LABEL,
    JOB_LABEL,
    RANK_LABEL,
    RESTART_LABEL,
    Owner,
    render_serving,
    render_training,
    rendezvous_id,
    serving_endpoints,
    shard_selector,
    worker_address,
)
from dsv3.operator.router_status import read_placement
from dsv3.operator.spec import GROUP, VERSION, SpecError, check_name, parse_serving, parse_training
from dsv3.operator.trainer_status import TrainerStatus, read_trainer_status

CONFIG = OperatorConfig.from_env()
TRAINING = (GROUP, VERSION, "deepseektrainingjobs")
SERVING = (GROUP, VERSION, "deepseekservingjobs")
_LOCKS: collections.defaultdict[str, threading.Lock] = collections.defaultdict(threading.Lock)
_CHILD_KINDS = (
    ("v1", "Pod"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "Deployment"),
)


DELETION_WAIT_SECONDS = 0.5  # how often a deletion re-checks for a timer still reconciling


@kopf.on.startup()
def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = False  # conditions carry the story; no Event objects
    settings.watching.server_timeout = 60
    # A deletion that lands while the resync timer is mid-reconcile (a sync handler in a thread) waits
    # for that timer to exit before the finalizer comes off. Kopf's defaults re-check after 60 s, so
    # `kubectl delete` hung for a minute whenever the two met; wait for the reconcile itself instead.
    settings.background.instant_exit_timeout = DELETION_WAIT_SECONDS
    settings.background.cancellation_polling = DELETION_WAIT_SECONDS
    memo.kube = Kube.from_environment()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _owner(kind: str, meta: Mapping[str, Any]) -> Owner:
    return Owner(kind, meta["name"], meta["namespace"], meta.get("uid") or "")


def _patch_status(patch: kopf.Patch, current: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Only changed keys: an unchanged job gets no status patch at all."""
    for k, v in new.items():
        if current.get(k) != v:
            patch.status[k] = v


def _invalid(
    patch: kopf.Patch, status: Mapping[str, Any], generation: int, err: SpecError, kind: str
) -> None:
    conds = cond.set_state(
        list(status.get("conditions") or []),
        "Failed" if kind == "training" else "Degraded",
        "InvalidSpec",
        f"{err} (nothing was created)",
        _now(),
        generation,
        exclusive=("Running", "Restarting", "Ready", "Progressing"),
    )
    _patch_status(patch, status, {"conditions": conds, "observedGeneration": generation})


# ---- training -------------------------------------------------------------------------------------


def reconcile_training(kube: Kube, body: Mapping[str, Any], patch: kopf.Patch, cfg: OperatorConfig) -> None:
    meta, status = body["metadata"], dict(body.get("status") or {})
    generation = int(meta.get("generation") or 1)
    try:
        check_name(meta["name"])
        spec = parse_training(body.get("spec") or {}, cfg.checkpoint_address, cfg.gpu_resource)
    except SpecError as err:
        _invalid(patch, status, generation, err, "training")
        return
    owner = _owner("DeepSeekTrainingJob", meta)
    ns = owner.namespace
    conds = status.get("conditions") or []
    if any(c.get("reason") == "InvalidSpec" for c in conds):  # fixed since: start from scratch
        status["conditions"] = [c for c in conds if c.get("reason") != "InvalidSpec"]
    selector = f"{JOB_LABEL}={owner.name},{COMPONENT_LABEL}=trainer"
    pods = [PodView.from_pod(p, RANK_LABEL, RESTART_LABEL) for p in kube.list("v1", "Pod", ns, selector)]
    decision = decide(owner.name, spec, status, pods, _now(), generation)
    new = dict(decision.status)
    for name in decision.delete_pods:
        kube.delete("v1", "Pod", ns, name)
    finished = any(cond.is_true(new["conditions"], t) for t in ("Succeeded", "Failed", "Suspended"))
    gen = (
        decision.create
        if decision.create is not None
        else int(new.get("podGeneration", status.get("podGeneration") or 0))
    )
    if not finished:
        for m in render_training(owner, spec, gen, cfg):
            if m.kind != "Pod" or decision.create is not None:
                kube.ensure(m, ns, immutable=m.kind == "Pod")
        new["rendezvousId"] = rendezvous_id(owner, gen)
    if (new.get("workers") or {}).get("running"):
        _read_progress(owner, spec.nodes, cfg, new, generation)
    if new.get("startTime", "") is None:
        new.pop("startTime")
        if "startTime" in status:
            patch.status["startTime"] = None
    _patch_status(patch, status, new)
    if decision.delete_job:
        kube.delete(f"{GROUP}/{VERSION}", "DeepSeekTrainingJob", ns, owner.name)


def _read_progress(
    owner: Owner, nodes: int, cfg: OperatorConfig, new: dict[str, Any], generation: int = 1
) -> None:
    """Step, loss, tokens/s and anomalies from rank 0 (tried on each worker host: c10d picks where rank 0
    runs). The trainer's last anomaly becomes `status.lastAnomaly` and, while the trainer says it is
    degraded, a `Degraded` condition (reason: the kind, message: the step and what was done), set False
    again once the trainer reports healthy steps."""
    for rank in range(nodes):
        got = read_trainer_status(
            worker_address(owner, rank, cfg.status_port, cfg), cfg.status_timeout_seconds
        )
        if got is None:
            continue
        new.update(step=got.step, totalSteps=got.total)
        if got.loss is not None:
            new["loss"] = round(got.loss, 4)
        if got.tokens_per_second is not None:
            new["tokensPerSecond"] = round(got.tokens_per_second, 1)
        if got.last_checkpoint_step is not None:
            new["lastCheckpointStep"] = got.last_checkpoint_step
        _degraded(got, new, generation)
        return


def _degraded(got: TrainerStatus, new: dict[str, Any], generation: int) -> None:
    anomaly = got.last_anomaly
    conds = list(new.get("conditions") or [])
    if anomaly is None:  # none yet, or a restarted trainer that has seen none since
        if cond.is_true(conds, "Degraded"):
            healthy = f"healthy: the trainer reports no anomaly since its start (step {got.step})"
            conds = cond.set_flag(conds, "Degraded", False, "Recovered", healthy, _now(), generation)
            new["conditions"] = conds
        return
    new["lastAnomaly"] = {
        "kind": anomaly.kind,
        "step": anomaly.step,
        "action": anomaly.action,
        "message": anomaly.message[:300],
    }
    what = f"{anomaly.kind} at step {anomaly.step} ({anomaly.action}): {anomaly.message}"[:500]
    if got.degraded:
        conds = cond.set_flag(conds, "Degraded", True, anomaly.reason, what, _now(), generation)
    else:
        healthy = f"healthy again at step {got.step}; last anomaly {what}"[:500]
        conds = cond.set_flag(conds, "Degraded", False, "Recovered", healthy, _now(), generation)
    new["conditions"] = conds


@kopf.on.resume(*TRAINING)
@kopf.on.create(*TRAINING)
@kopf.on.update(*TRAINING, field="spec")
@kopf.timer(*TRAINING, interval=CONFIG.resync_seconds, idle=0)
def training(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    with _LOCKS[body["metadata"].get("uid") or body["metadata"]["name"]]:  # timer vs change handler
        reconcile_training(memo.kube, body, patch, CONFIG)


# ---- serving --------------------------------------------------------------------------------------


def reconcile_serving(kube: Kube, body: Mapping[str, Any], patch: kopf.Patch, cfg: OperatorConfig) -> None:
    meta, status = body["metadata"], dict(body.get("status") or {})
    generation = int(meta.get("generation") or 1)
    try:
        check_name(meta["name"])
        spec = parse_serving(body.get("spec") or {}, cfg.checkpoint_address, cfg.redis_url, cfg.gpu_resource)
    except SpecError as err:
        _invalid(patch, status, generation, err, "serving")
        return
    owner = _owner("DeepSeekServingJob", meta)
    for m in render_serving(owner, spec, cfg):
        kube.ensure(m, owner.namespace)
    sts = kube.get("apps/v1", "StatefulSet", owner.namespace, f"{owner.name}-shard") or {}
    router = kube.get("apps/v1", "Deployment", owner.namespace, f"{owner.name}-router") or {}
    sts_status = sts.get("status") or {}
    replicas = int(sts_status.get("replicas", (sts.get("spec") or {}).get("replicas", 0)))
    ready = int(sts_status.get("readyReplicas") or 0)
    routers = int((router.get("status") or {}).get("availableReplicas") or 0)
    conds = list(status.get("conditions") or [])
    now = _now()
    moving = ("Ready", "Progressing", "Degraded")
    msg = f"{ready}/{spec.shard_replicas} expert shards ready"
    msg += f", {routers}/{spec.router_replicas} routers available"
    if ready == spec.shard_replicas and routers >= 1:
        conds = cond.set_state(conds, "Ready", "AllShardsReady", msg, now, generation, exclusive=moving)
    elif cond.is_true(conds, "Ready") and ready < replicas:
        conds = cond.set_state(conds, "Degraded", "ShardsNotReady", msg, now, generation, exclusive=moving)
    else:
        conds = cond.set_state(conds, "Progressing", "Rollout", msg, now, generation, exclusive=moving)
    endpoints = serving_endpoints(owner, spec, cfg)
    new = {
        "observedGeneration": generation,
        "conditions": conds,
        "shards": {"replicas": replicas, "ready": ready, "selector": shard_selector(owner.name)},
        "endpoint": endpoints,
    }
    if routers:
        _read_placement(endpoints["grpc"], cfg, new)
    _patch_status(patch, status, new)


def _read_placement(router: str, cfg: OperatorConfig, new: dict[str, Any]) -> None:
    """The router's placement version, balancedness, live shards and rebalances into `new` (a status)."""
    placement = read_placement(router, cfg.status_timeout_seconds)
    if placement is not None:
        new["placementVersion"] = placement.version
        new["balancedness"] = placement.balancedness
        new["shards"]["live"] = placement.live_shards
        new["rebalances"] = placement.rebalances


@kopf.on.resume(*SERVING)
@kopf.on.create(*SERVING)
@kopf.on.update(*SERVING, field="spec")
@kopf.timer(*SERVING, interval=CONFIG.resync_seconds, idle=0)
def serving(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    with _LOCKS[body["metadata"].get("uid") or body["metadata"]["name"]]:
        reconcile_serving(memo.kube, body, patch, CONFIG)


# ---- deletion -------------------------------------------------------------------------------------


def delete_children(kube: Kube, namespace: str, job: str) -> int:
    """Delete every child labelled with the job (ownerReferences let the GC do it too; this does not wait
    for it, so the children are gone even where the GC lags or is absent)."""
    removed = 0
    for api_version, kind in _CHILD_KINDS:
        for obj in kube.list(api_version, kind, namespace, f"{JOB_LABEL}={job}"):
            removed += kube.delete(api_version, kind, namespace, obj["metadata"]["name"])
    return removed


@kopf.on.delete(*TRAINING)
@kopf.on.delete(*SERVING)
def cleanup(meta: kopf.Meta, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    removed = delete_children(memo.kube, meta["namespace"], meta["name"])
    logger.info(f"deleted {removed} children of {meta['namespace']}/{meta['name']}")
