"""`dsv3-expert-shard` / `python -m dsv3.expert_shard`: flags and DSV3_* env -> ShardConfig -> serve."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from dsv3.expert_shard.config import ShardConfig
from dsv3.serving.flags import parse_config


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(ShardConfig, argv, description="dsv3 expert shard")
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dsv3.expert_shard.service import serve  # torch is imported only once the flags are valid

    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
