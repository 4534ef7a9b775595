"""`dsv3-checkpoint` / `python -m dsv3.checkpoint`: flags and DSV3_* env -> CheckpointConfig -> serve."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from dsv3.checkpoint.config import CheckpointConfig
from dsv3.checkpoint.service import serve
from dsv3.serving.flags import parse_config


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(CheckpointConfig, argv, description="dsv3 checkpoint service")
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
