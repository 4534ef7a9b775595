"""Status conditions (list-map keyed by `type`), ordered so that the current state is the last entry:
the printer column `State = .status.conditions[-1:].type` then always shows it."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

Condition = dict[str, Any]


def now_iso(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get(conditions: Iterable[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    for c in conditions:
        if c.get("type") == type_:
            return c
    return None


def is_true(conditions: Iterable[Mapping[str, Any]], type_: str) -> bool:
    c = get(conditions, type_)
    return c is not None and c.get("status") == "True"


def set_state(
    conditions: list[Mapping[str, Any]],
    type_: str,
    reason: str,
    message: str,
    now: datetime.datetime,
    generation: int,
    exclusive: tuple[str, ...] = (),
) -> list[Condition]:
    """Set `type_` True (moved last) and every other True condition in `exclusive` False.

    lastTransitionTime changes only when a condition's status flips; an unchanged condition is returned
    equal, so a reconcile that learns nothing new patches nothing."""
    out: list[Condition] = []
    target: Condition | None = None
    for c in conditions:
        c = dict(c)
        if c["type"] == type_:
            if c.get("status") != "True":
                c["lastTransitionTime"] = now_iso(now)
            c.update(status="True", reason=reason, message=message, observedGeneration=generation)
            target = c
            continue
        if c["type"] in exclusive and c.get("status") == "True":
            c.update(
                status="False",
                reason=f"{reason}",
                message=f"now {type_}: {message}",
                lastTransitionTime=now_iso(now),
                observedGeneration=generation,
            )
        out.append(c)
    if target is None:
        target = {
            "type": type_,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastTransitionTime": now_iso(now),
            "observedGeneration": generation,
        }
    out.append(target)
    return out


def set_flag(
    conditions: list[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime.datetime,
    generation: int,
) -> list[Condition]:
    """Set a condition that is not a state (e.g. `Degraded` next to `Running`) without moving it last.

    A new one goes just before the last entry, so `conditions[-1]` stays the job's state. A condition
    that does not exist yet is not created False (nothing to clear); an unchanged one is returned equal."""
    value = "True" if status else "False"
    out = [dict(c) for c in conditions]
    for c in out:
        if c["type"] == type_:
            if c.get("status") != value:
                c["lastTransitionTime"] = now_iso(now)
            c.update(status=value, reason=reason, message=message, observedGeneration=generation)
            return out
    if not status:
        return out
    new = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now_iso(now),
        "observedGeneration": generation,
    }
    return [*out[:-1], new, *out[-1:]]
