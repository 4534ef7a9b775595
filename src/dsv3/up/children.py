"""The child processes of `dsv3 up`: started by name, watched, and never left behind.

Each child runs in its own session (so a signal to its process group reaches what it spawned, e.g.
torchrun's workers), dies with `dsv3 up` even if that is SIGKILLed (Linux `PR_SET_PDEATHSIG`), and
carries `DSV3_UP_RUN=<run id>` in its environment so that a sweep (and a test) can find every process of
a run. A child that exits while it is meant to be running raises `ChildExited`, naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

RUN_ENV = "DSV3_UP_RUN"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildExited(RuntimeError):
    """A child that should be running has exited; the message names it, its exit and its log."""

    def __init__(self, name: str, pid: int, returncode: int, log: Path) -> None:
        how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
        super().__init__(f"the {name} process (pid {pid}) exited with {how}; its log: {log}")
        self.name, self.pid, self.returncode, self.log = name, pid, returncode, log


@dataclasses.dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path
    may_exit: bool = False  # a job that finishes (the trainer) rather than a service

    @property
    def pid(self) -> int:
        return self.process.pid


class Children:
    """Every process `dsv3 up` started; `stop()` (also on leaving the `with`) ends them all."""

    def __init__(self, log_dir: Path, run_id: str, threads: int = 1) -> None:
        self.log_dir, self.run_id, self.threads = log_dir, run_id, threads
        self.children: dict[str, Child] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, name: str, argv: Sequence[str], may_exit: bool = False, env: dict | None = None) -> Child:
        if name in self.children and self.children[name].process.poll() is None:
            raise RuntimeError(f"{name} is already running")
        log = self.log_dir / f"{name}.log"
        environment = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "PYTHONUNBUFFERED": "1",
            RUN_ENV: self.run_id,
            **(env or {}),
        }
        with log.open("ab") as out:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=environment,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, process, log, may_exit)
        self.children[name] = child
        return child

    def check(self) -> None:
        """Raise `ChildExited` for the first service that is no longer running."""
        for child in self.children.values():
            code = child.process.poll()
            if code is not None and not (child.may_exit and code == 0):
                raise ChildExited(child.name, child.pid, code, child.log)

    def wait_exit(self, name: str, timeout: float | None = None, tick: float = 0.2, on_tick=None) -> int:
        """Wait for the job `name` to finish, watching the services meanwhile; its exit code."""
        child = self.children[name]
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := child.process.poll()) is None:
            self.check()
            if on_tick is not None:
                on_tick()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not finish within {timeout:.0f} s; its log: {child.log}")
            time.sleep(tick)
        if code != 0:
            raise ChildExited(name, child.pid, code, child.log)
        return code

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every child's process group, then SIGKILL what is left after `grace` seconds."""
        for child in reversed(list(self.children.values())):
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(max(0.0, deadline - time.monotonic()))
        for child in self.children.values():
            _signal_group(child.process, signal.SIGKILL)  # also whatever it spawned and left behind
            with contextlib.suppress(subprocess.TimeoutExpired):  # a process in uninterruptible sleep
                child.process.wait(5)


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # the child is its session's (and group's) leader
