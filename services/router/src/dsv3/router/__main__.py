"""`dsv3-router` / `python -m dsv3.router`: flags and DSV3_* env -> RouterConfig -> serve."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from dsv3.router.config import RouterConfig
from dsv3.serving.flags import parse_config


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(RouterConfig, argv, description="dsv3 router")
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dsv3.router.service import serve  # torch and the model load only once the flags are valid

    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
