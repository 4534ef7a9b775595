"""Validation of the identifiers a client sends: job ids, steps, parts and tensor names.

Job ids become directory names, so they are held to a strict alphabet; tensor names only live inside
safetensors headers, but names with path tricks are refused anyway so no later tool is surprised.
"""

from __future__ import annotations

import re

_JOB = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_TENSOR_NAME = 1024


class InvalidRequest(ValueError):
    """The request itself is wrong (maps to INVALID_ARGUMENT); the message names the field."""


def check_job(job: str) -> str:
    if not _JOB.match(job) or ".." in job:
        raise InvalidRequest(f"job {job!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}} without '..'")
    return job


def check_step(step: int) -> int:
    if step < 0:
        raise InvalidRequest(f"step must be >= 0, got {step}")
    return step


def check_part(part: int, num_parts: int | None = None) -> int:
    if part < 0 or (num_parts is not None and part >= num_parts):
        raise InvalidRequest(f"part must be in [0, {num_parts or 'inf'}), got {part}")
    return part


def check_tensor_name(name: str) -> str:
    if not name or len(name) > MAX_TENSOR_NAME:
        raise InvalidRequest(f"tensor name must have 1..{MAX_TENSOR_NAME} characters, got {len(name)}")
    if "\x00" in name or "/" in name or "\\" in name or ".." in name or name == "__metadata__":
        raise InvalidRequest(f"tensor name {name!r} contains a forbidden sequence (NUL, '/', '\\\\', '..')")
    return name
