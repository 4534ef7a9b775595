"""The Redis registry of expert shards: each shard announces its address under a key with a TTL.

A shard renews its key every `ttl / 3` seconds; one that dies drops out of the registry within `ttl`.
The router lists the keys every few seconds. `redis` is imported lazily: only processes started with
`--redis-url` need it (dsv3-rpc itself stays free of it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

PREFIX = "dsv3:shards:"
log = logging.getLogger(__name__)


def shard_key(shard_id: str) -> str:
    return PREFIX + shard_id


async def announce(
    redis_url: str, shard_id: str, address: str, ttl_seconds: float, stop: asyncio.Event
) -> None:
    """Keep `shard_id -> address` in the registry until `stop` is set, then remove it."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        while not stop.is_set():
            try:
                await client.set(shard_key(shard_id), address, px=int(ttl_seconds * 1000))
            except Exception as exc:
                log.warning("registry: cannot announce %s: %s", shard_id, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ttl_seconds / 3)
        with contextlib.suppress(Exception):
            await client.delete(shard_key(shard_id))
    finally:
        await client.aclose()


async def list_shards(client) -> dict[str, str]:
    """shard id -> address of every live announcement (`client`: a redis.asyncio.Redis)."""
    keys = [key async for key in client.scan_iter(match=PREFIX + "*")]
    if not keys:
        return {}
    values = await client.mget(keys)
    return {
        (k.decode() if isinstance(k, bytes) else k).removeprefix(PREFIX): (
            v.decode() if isinstance(v, bytes) else v
        )
        for k, v in zip(keys, values, strict=True)
        if v is not None
    }
