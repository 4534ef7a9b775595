"""The training lifecycle as data: pods in, conditions and actions out."""

from __future__ import annotations

import datetime

from op_helpers import EXAMPLES, load

from dsv3.operator.lifecycle import Decision, PodView, decide
from dsv3.operator.spec import parse_training

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _spec(**run_policy):
    spec = load(EXAMPLES / "training-debug.yaml")["spec"]
    spec["runPolicy"] = {"backoffLimit": 2, **run_policy}
    return parse_training(spec, "ck:1")


def _pods(gen: int, *phases: str, code: int | None = None) -> list[PodView]:
    return [
        PodView(
            f"j-w{r}-r{gen}", r, gen, ph, code if ph == "Failed" else None, "Error" if ph == "Failed" else ""
        )
        for r, ph in enumerate(phases)
    ]


def _step(spec, status, pods, seconds: float = 0) -> tuple[Decision, dict]:
    d = decide("j", spec, status, pods, T0 + datetime.timedelta(seconds=seconds), 1)
    merged = {**status, **d.status}
    return d, {k: v for k, v in merged.items() if v is not None}


def _state(status) -> str:
    return status["conditions"][-1]["type"]


def test_created_running_succeeded() -> None:
    spec = _spec()
    d, st = _step(spec, {}, [])
    assert d.create == 0 and _state(st) == "Created" and st["workers"]["desired"] == 2
    d, st = _step(spec, st, _pods(0, "Pending", "Running"))
    assert d.create is None and _state(st) == "Created" and st["workers"]["summary"] == "1/2"
    d, st = _step(spec, st, _pods(0, "Running", "Running"))
    assert _state(st) == "Running" and st["conditions"][-1]["reason"] == "JobRunning"
    d, st = _step(spec, st, _pods(0, "Succeeded", "Succeeded"), 10)
    assert _state(st) == "Succeeded" and st["completionTime"] == "2026-01-01T00:00:10Z"
    assert [c["type"] for c in st["conditions"] if c["status"] == "True"] == ["Created", "Succeeded"]


def test_a_second_decision_on_unchanged_pods_changes_nothing() -> None:
    spec = _spec()
    _, st = _step(spec, {}, [])
    _, st = _step(spec, st, _pods(0, "Running", "Running"))
    d, st2 = _step(spec, st, _pods(0, "Running", "Running"), 5)
    assert st2 == st and d.create is None and d.delete_pods == ()


def test_failure_restarts_the_group_with_a_new_generation_then_resumes() -> None:
    spec = _spec()
    _, st = _step(spec, {"lastCheckpointStep": 150}, [])
    _, st = _step(spec, st, _pods(0, "Running", "Running"))
    d, st = _step(spec, st, _pods(0, "Running", "Failed", code=137))
    assert d.create == 1 and set(d.delete_pods) == {"j-w0-r0", "j-w1-r0"}
    last = st["conditions"][-1]
    assert (last["type"], last["reason"]) == ("Restarting", "WorkerFailed")
    assert "pod j-w1-r0 (rank 1) failed with exit code 137 (Error)" in last["message"]
    assert "(1/2)" in last["message"] and "step 150" in last["message"]
    assert st["restarts"] == 1 and st["podGeneration"] == 1
    d, st = _step(spec, st, _pods(1, "Running", "Running") + _pods(0, "Failed"))
    assert d.delete_pods == ("j-w0-r0",)  # a stale pod of the old generation
    assert (st["conditions"][-1]["type"], st["conditions"][-1]["reason"]) == ("Running", "JobResumed")
    assert next(c for c in st["conditions"] if c["type"] == "Restarting")["status"] == "False"


def test_backoff_limit_exhausted_fails_with_the_reason() -> None:
    spec = _spec(backoffLimit=1)
    st = {"restarts": 1, "podGeneration": 1, "conditions": []}
    d, st = _step(spec, st, _pods(1, "Failed", "Running", code=1))
    last = st["conditions"][-1]
    assert (last["type"], last["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert (
        "j-w0-r1" in last["message"]
        and "exit code 1" in last["message"]
        and "no checkpoint" in last["message"]
    )
    assert d.create is None and d.delete_pods == ("j-w1-r1",)  # cleanPodPolicy Running: the running one


def test_exit_code_policy_treats_low_codes_as_permanent() -> None:
    spec = _spec(restartPolicy="ExitCode")
    d, st = _step(spec, {}, _pods(0, "Failed", "Running", code=2))
    assert st["conditions"][-1]["reason"] == "PermanentError" and d.create is None
    d, st = _step(spec, {}, _pods(0, "Failed", "Running", code=143))
    assert st["conditions"][-1]["type"] == "Restarting" and d.create == 1


def test_a_lost_worker_of_a_running_group_counts_as_a_failure() -> None:
    spec = _spec()
    _, st = _step(spec, {}, [])
    _, st = _step(spec, st, _pods(0, "Running", "Running"))
    _, st = _step(spec, st, _pods(0, "Running"))
    assert st["conditions"][-1]["type"] == "Restarting" and "WorkerLost" in st["conditions"][-1]["message"]


def test_active_deadline_fails_the_job_and_deletes_its_pods() -> None:
    spec = _spec(activeDeadlineSeconds=60)
    _, st = _step(spec, {}, [])
    d, st = _step(spec, st, _pods(0, "Running", "Running"), 61)
    assert (st["conditions"][-1]["type"], st["conditions"][-1]["reason"]) == ("Failed", "DeadlineExceeded")
    assert len(d.delete_pods) == 2


def test_suspend_deletes_pods_and_resume_starts_a_new_generation() -> None:
    _, st = _step(_spec(), {}, [])
    _, st = _step(_spec(), st, _pods(0, "Running", "Running"))
    d, st = _step(_spec(suspend=True), st, _pods(0, "Running", "Running"), 5)
    assert _state(st) == "Suspended" and len(d.delete_pods) == 2 and "startTime" not in st
    d, st = _step(_spec(suspend=True), st, [], 6)
    assert d.create is None
    d, st = _step(_spec(), st, [], 7)
    assert d.create == 1 and st["startTime"] == "2026-01-01T00:00:07Z"
    assert next(c for c in st["conditions"] if c["type"] == "Suspended")["status"] == "False"


def test_ttl_after_finished_deletes_the_job() -> None:
    spec = _spec(ttlSecondsAfterFinished=30)
    st = {"completionTime": "2026-01-01T00:00:00Z", "conditions": [{"type": "Succeeded", "status": "True"}]}
    assert not _step(spec, st, [], 29)[0].delete_job
    assert _step(spec, st, [], 30)[0].delete_job
