"""What a training job does next: a pure function of its spec, status and pods (tested as data).

Designed against the usual complaints about training operators: a job is never left in a state its
pods contradict (every reconcile recomputes it from the pods), a failed worker restarts the whole group
with a fresh rendezvous id (so restarted workers can rejoin), and every failure condition names the
pod, its exit code or reason, and the last committed checkpoint step.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from dsv3.operator import conditions as cond
from dsv3.operator.render import worker_pod_name
from dsv3.operator.spec import TrainingSpec

STATES = ("Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
_MOVING = ("Running", "Restarting", "Suspended")


@dataclasses.dataclass(frozen=True)
class PodView:
    """The little the lifecycle needs from a worker pod."""

    name: str
    rank: int
    generation: int
    phase: str  # Pending / Running / Succeeded / Failed / Unknown
    exit_code: int | None = None
    reason: str = ""

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any], rank_label: str, gen_label: str) -> PodView:
        labels = pod.get("metadata", {}).get("labels", {})
        status = pod.get("status") or {}
        code: int | None = None
        reason = status.get("reason", "") or ""
        for cs in status.get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                code = term.get("exitCode")
                reason = term.get("reason") or reason
        return cls(
            name=pod["metadata"]["name"],
            rank=int(labels.get(rank_label, -1)),
            generation=int(labels.get(gen_label, -1)),
            phase=status.get("phase") or "Pending",
            exit_code=code,
            reason=reason,
        )

    def describe(self) -> str:
        what = f"exit code {self.exit_code}" if self.exit_code is not None else "no exit code"
        return f"pod {self.name} (rank {self.rank}) failed with {what}" + (
            f" ({self.reason})" if self.reason else ""
        )


@dataclasses.dataclass(frozen=True)
class Decision:
    """Actions for the handler: create generation `create` (None: nothing), delete pods, patch status."""

    status: dict[str, Any]
    create: int | None = None
    delete_pods: tuple[str, ...] = ()
    delete_job: bool = False


def _parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _workers(spec: TrainingSpec, pods: Sequence[PodView]) -> dict[str, Any]:
    count = {p: sum(1 for x in pods if x.phase == p) for p in ("Running", "Succeeded", "Failed")}
    active = sum(1 for x in pods if x.phase in ("Pending", "Running", "Unknown"))
    return {
        "desired": spec.nodes,
        "active": active,
        "running": count["Running"],
        "succeeded": count["Succeeded"],
        "failed": count["Failed"],
        "summary": f"{count['Running']}/{spec.nodes}",
    }


def _cleanup(policy: str, pods: Sequence[PodView]) -> tuple[str, ...]:
    if policy == "All":
        return tuple(p.name for p in pods)
    if policy == "Running":
        return tuple(p.name for p in pods if p.phase in ("Pending", "Running", "Unknown"))
    return ()


def decide(
    name: str,
    spec: TrainingSpec,
    status: Mapping[str, Any],
    pods: Sequence[PodView],
    now: datetime.datetime,
    generation: int,
) -> Decision:
    """One reconcile step. `status` is the job's current status, `generation` its metadata.generation."""
    conds: list[Mapping[str, Any]] = list(status.get("conditions") or [])
    restarts = int(status.get("restarts") or 0)
    pod_gen = int(status.get("podGeneration") or 0)
    step = status.get("lastCheckpointStep")
    at_step = f"last committed checkpoint step {step}" if step is not None else "no checkpoint committed yet"
    new: dict[str, Any] = {"observedGeneration": generation}

    def state(type_: str, reason: str, message: str) -> None:
        nonlocal conds
        conds = cond.set_state(conds, type_, reason, message, now, generation, exclusive=_MOVING)

    def done(**kw: Any) -> Decision:
        new["conditions"] = conds
        return Decision(status=new, **kw)

    current = [p for p in pods if p.generation == pod_gen]
    stale = tuple(p.name for p in pods if p.generation != pod_gen)
    new["workers"] = _workers(spec, current)

    if cond.is_true(conds, "Succeeded") or cond.is_true(conds, "Failed"):
        finished = _parse_time(status.get("completionTime")) or now
        ttl = spec.ttl_seconds_after_finished
        expired = ttl is not None and (now - finished).total_seconds() >= ttl
        return done(delete_pods=stale + _cleanup(spec.clean_pod_policy, current), delete_job=expired)

    if spec.suspend:
        if not cond.is_true(conds, "Suspended"):
            state("Suspended", "JobSuspended", f"spec.runPolicy.suspend is true: workers deleted; {at_step}")
            new["podGeneration"] = pod_gen + 1  # resuming starts a new rendezvous
        new["startTime"] = None  # the deadline counts from the resume
        return done(delete_pods=tuple(p.name for p in pods))

    start = _parse_time(status.get("startTime"))
    if start is None:
        start = now
        new["startTime"] = cond.now_iso(now)
    deadline = spec.active_deadline_seconds
    if deadline is not None and (now - start).total_seconds() > deadline:
        state(
            "Failed",
            "DeadlineExceeded",
            f"ran longer than spec.runPolicy.activeDeadlineSeconds={deadline} "
            f"since {cond.now_iso(start)}; {at_step}",
        )
        new["completionTime"] = cond.now_iso(now)
        return done(delete_pods=tuple(p.name for p in pods))

    failed = sorted((p for p in current if p.phase == "Failed"), key=lambda p: p.rank)
    ranks = {p.rank for p in current}
    was_running = status.get("runningGeneration") == pod_gen
    if not failed and was_running and len(ranks) < spec.nodes:
        lost = min(set(range(spec.nodes)) - ranks)
        failed = [PodView(worker_pod_name(name, lost, pod_gen), lost, pod_gen, "Failed", None, "WorkerLost")]
    if failed:
        first = failed[0]
        code = first.exit_code
        permanent = spec.restart_policy == "Never" or (
            spec.restart_policy == "ExitCode" and code is not None and 0 < code < 128
        )
        if not permanent and restarts < spec.backoff_limit:
            new["restarts"] = restarts + 1
            new["podGeneration"] = pod_gen + 1
            state(
                "Restarting",
                "WorkerFailed",
                f"{first.describe()}; restarting all {spec.nodes} workers "
                f"({restarts + 1}/{spec.backoff_limit}) from the {at_step}",
            )
            new["workers"] = _workers(spec, [])
            return done(create=pod_gen + 1, delete_pods=tuple(p.name for p in pods))
        reason = "PermanentError" if permanent else "BackoffLimitExceeded"
        why = (
            f"spec.runPolicy.restartPolicy={spec.restart_policy} does not retry it"
            if permanent
            else f"spec.runPolicy.backoffLimit={spec.backoff_limit} restarts used"
        )
        state("Failed", reason, f"{first.describe()}; {why}; {at_step}")
        new["completionTime"] = cond.now_iso(now)
        return done(delete_pods=stale + _cleanup(spec.clean_pod_policy, current))

    create = pod_gen if len(ranks) < spec.nodes else None
    if cond.get(conds, "Created") is None:
        state("Created", "JobCreated", f"created {spec.nodes} worker pods and their headless Service")
    if cond.is_true(conds, "Suspended"):
        state("Created", "JobResumed", f"resumed: recreating {spec.nodes} worker pods")
    if len(current) == spec.nodes and all(p.phase == "Succeeded" for p in current):
        state("Succeeded", "JobSucceeded", f"all {spec.nodes} workers exited 0; {at_step}")
        new["completionTime"] = cond.now_iso(now)
        return done(delete_pods=stale + _cleanup(spec.clean_pod_policy, current))
    running = [p for p in current if p.phase in ("Running", "Succeeded")]
    if len(running) == spec.nodes and any(p.phase == "Running" for p in current):
        resumed = cond.is_true(conds, "Restarting")
        reason = "JobResumed" if resumed else "JobRunning"
        msg = f"{spec.nodes}/{spec.nodes} workers running" + (
            f" after restart {restarts} (rendezvous generation {pod_gen})" if resumed else ""
        )
        if not cond.is_true(conds, "Running") or resumed:
            state("Running", reason, msg)
        new["runningGeneration"] = pod_gen
    return done(create=create, delete_pods=stale)
