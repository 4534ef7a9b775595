"""Where the index of committed checkpoints lives: Redis, or an embedded SQLite file in local mode.

The index is a cache of the manifests on disk: it answers list/latest/load lookups without touching
the data volume, and is rebuilt from the manifests when it is empty or stale (see `reconcile`).
Redis may restart empty under a running server: a marker key written after every rebuild is read in
the same round trip as every lookup, so its absence (IndexLost) is noticed by the next call.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


class IndexLost(Exception):
    """The index lost its contents (Redis restarted empty); rebuild it from the manifests on disk."""


class MetadataStore(Protocol):
    def ping(self) -> None: ...
    def mark(self) -> None: ...
    def put(self, manifest: dict[str, Any]) -> None: ...
    def get(self, job: str, step: int) -> dict[str, Any] | None: ...
    def steps(self, job: str) -> list[int]: ...
    def remove(self, job: str, step: int) -> None: ...
    def keys(self) -> set[tuple[str, int]]: ...
    def close(self) -> None: ...


class SqliteStore:
    """Embedded index for local mode: one SQLite file under the data directory."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS checkpoints "
            "(job TEXT, step INTEGER, manifest TEXT, PRIMARY KEY (job, step))"
        )

    def ping(self) -> None:
        with self._lock:
            self._db.execute("SELECT 1").fetchone()

    def mark(self) -> None:
        """Nothing to mark: an embedded file does not lose its contents under a running server."""

    def put(self, manifest: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)",
                (manifest["job"], manifest["step"], json.dumps(manifest)),
            )

    def get(self, job: str, step: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT manifest FROM checkpoints WHERE job=? AND step=?", (job, step)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def steps(self, job: str) -> list[int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT step FROM checkpoints WHERE job=? ORDER BY step", (job,)
            ).fetchall()
        return [r[0] for r in rows]

    def remove(self, job: str, step: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM checkpoints WHERE job=? AND step=?", (job, step))

    def keys(self) -> set[tuple[str, int]]:
        with self._lock:
            return {(j, s) for j, s in self._db.execute("SELECT job, step FROM checkpoints").fetchall()}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisStore:
    """Index in Redis: a sorted set of steps per job plus one JSON manifest per checkpoint."""

    PREFIX = "dsv3:checkpoint"

    def __init__(self, url: str, timeout_seconds: float = 2.0) -> None:
        # Short timeouts and no silent retries: a hung Redis must turn into UNAVAILABLE quickly.
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
        )
        self._marker = f"{self.PREFIX}:marker"
        self._redis.ping()

    def _steps_key(self, job: str) -> str:
        return f"{self.PREFIX}:steps:{job}"

    def _manifest_key(self, job: str, step: int) -> str:
        return f"{self.PREFIX}:manifest:{job}:{step}"

    def _run(self, pipe: redis.client.Pipeline) -> list[Any]:
        """Execute a pipeline that starts with EXISTS marker; IndexLost if the marker is gone."""
        marked, *results = pipe.execute()
        if not marked:
            raise IndexLost("the Redis index lost its contents")
        return results

    def _pipe(self, transaction: bool = False) -> redis.client.Pipeline:
        pipe = self._redis.pipeline(transaction=transaction)
        pipe.exists(self._marker)
        return pipe

    def ping(self) -> None:
        if not self._redis.exists(self._marker):
            raise IndexLost("the Redis index lost its contents")

    def mark(self) -> None:
        self._redis.set(self._marker, "1")

    def put(self, manifest: dict[str, Any]) -> None:
        job, step = manifest["job"], manifest["step"]
        pipe = self._pipe(transaction=True)
        pipe.set(self._manifest_key(job, step), json.dumps(manifest))
        pipe.zadd(self._steps_key(job), {str(step): step})
        pipe.sadd(f"{self.PREFIX}:jobs", job)
        self._run(pipe)

    def get(self, job: str, step: int) -> dict[str, Any] | None:
        pipe = self._pipe()
        pipe.get(self._manifest_key(job, step))
        (raw,) = self._run(pipe)
        return json.loads(raw) if raw else None

    def steps(self, job: str) -> list[int]:
        pipe = self._pipe()
        pipe.zrange(self._steps_key(job), 0, -1)
        (steps,) = self._run(pipe)
        return [int(s) for s in steps]

    def remove(self, job: str, step: int) -> None:
        pipe = self._pipe(transaction=True)
        pipe.zrem(self._steps_key(job), str(step))
        pipe.delete(self._manifest_key(job, step))
        self._run(pipe)

    def keys(self) -> set[tuple[str, int]]:
        jobs = [j.decode() for j in self._redis.smembers(f"{self.PREFIX}:jobs")]
        return {(job, int(step)) for job in jobs for step in self._redis.zrange(self._steps_key(job), 0, -1)}

    def close(self) -> None:
        self._redis.close()


def open_store(redis_url: str | None, data_dir: Path, timeout_seconds: float = 2.0) -> MetadataStore:
    return RedisStore(redis_url, timeout_seconds) if redis_url else SqliteStore(data_dir / "index.sqlite")


def reconcile(store: MetadataStore, manifests: list[dict[str, Any]]) -> tuple[int, int]:
    """Make the index equal to the committed manifests on disk; returns (added, removed)."""
    on_disk = {(m["job"], m["step"]): m for m in manifests}
    indexed = store.keys()
    added = [store.put(on_disk[key]) for key in on_disk.keys() - indexed]
    removed = [store.remove(*key) for key in indexed - on_disk.keys()]
    return len(added), len(removed)
