"""`dsv3-trainer` / `python -m dsv3.trainer`: `--config` file, flags and DSV3_* env -> TrainConfig -> train.

Run it under torchrun for more than one process:
    torchrun --standalone --nproc-per-node 4 -m dsv3.trainer --ep 2 --steps 100
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from dsv3.trainer.config import SettingsError, parse_settings


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dsv3.trainer.anomaly import AnomalyError
    from dsv3.trainer.loop import train  # torch and the model load only after the settings parsed

    try:
        train(config)
    except SettingsError as exc:
        sys.exit(f"dsv3-trainer: error: {exc}")
    except AnomalyError as exc:
        sys.exit(f"dsv3-trainer: error: anomaly_policy: {exc}")


if __name__ == "__main__":
    main()
