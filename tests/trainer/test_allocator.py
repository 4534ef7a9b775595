"""keep_freed_memory: a process that allocates and frees step-sized buffers stops page-faulting them in
again. Each case runs in its own interpreter (malloc settings are per process), the same allocation
pattern twice; the second pass's minor page faults are counted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PATTERN = """
import resource, sys, torch
from dsv3.trainer.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None

def one_pass():  # a step's buffers of 4-24 MiB, ~250 MiB alive at its peak, then all freed
    alive = [torch.ones(mib << 18) for mib in [8, 16, 4, 24, 12, 8, 16, 20, 6, 10] * 2]
    alive.clear()

one_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_pass()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_pass_faults(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    command = [sys.executable, "-c", PATTERN, mode]
    out = subprocess.run(command, env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and ru_minflt")
def test_freed_buffers_are_reused_instead_of_faulted_in_again() -> None:
    _, plain = _second_pass_faults("plain")
    applied, tuned = _second_pass_faults("tuned")
    assert applied == "True"
    # glibc's defaults trim the freed heap top back to the OS: the next pass faults its ~250 MiB in again
    assert plain > 30_000, plain
    assert tuned * 5 < plain, (tuned, plain)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and ru_minflt")
def test_malloc_settings_from_the_environment_win() -> None:
    applied, _ = _second_pass_faults("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
    applied, _ = _second_pass_faults("tuned", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")
    assert applied == "False"
