"""Several real trainer runs in one torchrun launch (tests only), to pay process start-up once.

    torchrun --nproc-per-node 2 tests/trainer/multi_run.py RUNS.json

RUNS.json is a list of {"argv": [...], "env": {...}}: each run is `parse_settings(argv)` then `train`,
exactly what `python -m dsv3.trainer` does, with `env` set for that run (e.g. DSV3_FAULT_INJECTION).
Every run builds and destroys its own process group; each gets its own rendezvous prefix by setting
TORCHELASTIC_RESTART_COUNT to 100 + its index (so fault-injection specs here need `attempt=any`).
A run that raises ends the launch with that error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from dsv3.trainer.config import parse_settings
from dsv3.trainer.loop import train


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runs = json.loads(Path(sys.argv[1]).read_text())
    base_env = dict(os.environ)
    for index, run in enumerate(runs):
        os.environ.clear()
        os.environ.update(base_env, **run.get("env", {}), TORCHELASTIC_RESTART_COUNT=str(100 + index))
        train(parse_settings(run["argv"]))


if __name__ == "__main__":
    main()
