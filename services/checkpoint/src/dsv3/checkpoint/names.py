"""Validation of the identifiers and counts a client sends: job ids, steps, parts, tensor names.

Job ids become directory names, so they are held to a strict alphabet; tensor names only live inside
safetensors headers, but names with path tricks are refused anyway so no later tool is surprised.
Counts have ceilings so that no request makes the server build something huge, and error messages
quote at most a short prefix of what the client sent.
"""

from __future__ import annotations

import re

_JOB = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_TENSOR_NAME = 1024
MAX_PARTS = 1 << 16  # parts per checkpoint (one per rank): num_parts and part numbers stay below this
MAX_METADATA_BYTES = 64 << 10  # keys + values of one request's metadata map
MAX_QUOTED = 48  # characters of a client's string quoted back in an error message


class InvalidRequest(ValueError):
    """The request itself is wrong (maps to INVALID_ARGUMENT); the message names the field."""


def quoted(text: str) -> str:
    """`text` as repr, cut to a short prefix: an error must not echo a megabyte back."""
    if len(text) <= MAX_QUOTED:
        return repr(text)
    return f"{text[:MAX_QUOTED]!r}... ({len(text)} characters)"


def check_job(job: str) -> str:
    if not _JOB.fullmatch(job) or ".." in job:
        raise InvalidRequest(f"job {quoted(job)} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}} without '..'")
    return job


def check_step(step: int) -> int:
    if step < 0:
        raise InvalidRequest(f"step must be >= 0, got {step}")
    return step


def check_part(part: int) -> int:
    if not 0 <= part < MAX_PARTS:
        raise InvalidRequest(f"part must be in [0, {MAX_PARTS}), got {part}")
    return part


def check_num_parts(num_parts: int) -> int:
    if not 1 <= num_parts <= MAX_PARTS:
        raise InvalidRequest(f"num_parts must be in [1, {MAX_PARTS}], got {num_parts}")
    return num_parts


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    size = sum(len(k) + len(v) for k, v in metadata.items())
    if size > MAX_METADATA_BYTES:
        raise InvalidRequest(f"metadata holds {size} characters, at most {MAX_METADATA_BYTES} allowed")
    return metadata


def check_tensor_name(name: str) -> str:
    if not name or len(name) > MAX_TENSOR_NAME:
        raise InvalidRequest(f"tensor name must have 1..{MAX_TENSOR_NAME} characters, got {len(name)}")
    if "\x00" in name or "/" in name or "\\" in name or ".." in name or name == "__metadata__":
        raise InvalidRequest(
            f"tensor name {quoted(name)} contains a forbidden sequence (NUL, '/', '\\\\', '..')"
        )
    return name
