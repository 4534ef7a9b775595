"""The CheckpointService gRPC servicer: validation, status codes, and the asyncio side of storage.

Disk work runs on the service's own thread pools, never the index's, so a hung Redis cannot stall a
Save; every blocking step goes through `threads.run_to_end`, so a cancelled RPC cleans up only after
its threads are done. Save and Load streams pass a `StreamGate`, which bounds the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import redis

from dsv3.checkpoint import names, wire
from dsv3.checkpoint.config import CheckpointConfig, retained
from dsv3.checkpoint.gate import Busy, StreamGate
from dsv3.checkpoint.index import Index
from dsv3.checkpoint.partfile import PartKey, TensorEntry
from dsv3.checkpoint.prefetch import prefetched
from dsv3.checkpoint.quota import SpaceLedger, StorageFull
from dsv3.checkpoint.reader import CheckpointReader, Deleted, check_manifest, select_tensors
from dsv3.checkpoint.saving import SaveSession
from dsv3.checkpoint.split import balanced_runs
from dsv3.checkpoint.steps import Superseded
from dsv3.checkpoint.storage import CorruptData, Layout, NotFound, WrongState
from dsv3.checkpoint.store import IndexLost, MetadataStore, open_store
from dsv3.checkpoint.threads import finish, run_to_end, settle
from dsv3.rpc.v1 import checkpoint_pb2, checkpoint_pb2_grpc, tensor_pb2
from dsv3.serving import dtypes, telemetry
from dsv3.serving.server import ServiceServer
from dsv3.serving.server import serve as serve_forever

log = logging.getLogger(__name__)
MAX_SEGMENTS = 64  # streams per part; more only costs file handles and staging buffers
MAX_DETAILS = 512  # characters of an error message sent back
SERVICE_NAME = checkpoint_pb2.DESCRIPTOR.services_by_name["CheckpointService"].full_name
T = TypeVar("T")

_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the data volume",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the data volume is read-only",
    errno.EACCES: "the data directory is not writable",
    errno.EPERM: "the data directory is not writable",
}
_CODES: list[tuple[type[BaseException] | tuple[type[BaseException], ...], grpc.StatusCode]] = [
    ((names.InvalidRequest, dtypes.TensorCodecError), grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (WrongState, grpc.StatusCode.FAILED_PRECONDITION),
    ((Superseded, Deleted), grpc.StatusCode.ABORTED),
    (CorruptData, grpc.StatusCode.DATA_LOSS),
    ((StorageFull, Busy), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IndexLost, grpc.StatusCode.UNAVAILABLE),
]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status an exception maps to, or None for an unexpected error."""
    for kinds, code in _CODES:
        if isinstance(exc, kinds):
            return code, str(exc)[:MAX_DETAILS]
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{_DISK_ERRNOS[exc.errno]} ({exc.strerror})"
    if isinstance(exc, redis.RedisError):
        return grpc.StatusCode.UNAVAILABLE, f"metadata store unavailable: {exc}"[:MAX_DETAILS]
    return None


@contextlib.asynccontextmanager
async def _status_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    try:
        yield
    except Exception as exc:
        mapped = status_for(exc)
        if mapped is None:
            log.exception("unexpected error")
            raise
        await context.abort(*mapped)


def _parsed(request: T | wire.Malformed) -> T:
    if isinstance(request, wire.Malformed):
        raise names.InvalidRequest(request.reason)
    return request


def _info(manifest: dict[str, Any]) -> checkpoint_pb2.CheckpointInfo:
    parts = [
        checkpoint_pb2.PartInfo(
            part=p["part"],
            file=p["file"],
            size_bytes=p["size_bytes"],
            header_crc32=p["header_crc32"],
            num_tensors=len(p["tensors"]),
            segment=p.get("segment", 0),
            num_segments=p.get("num_segments", 1),
            attempt=p.get("attempt", 0),
        )
        for p in manifest["parts"]
    ]
    return checkpoint_pb2.CheckpointInfo(
        job=manifest["job"],
        step=manifest["step"],
        parts=parts,
        total_bytes=manifest.get("total_bytes", 0),
        metadata=manifest.get("metadata", {}),
        committed_unix_ms=manifest.get("committed_unix_ms", 0),
    )


class CheckpointServicer(checkpoint_pb2_grpc.CheckpointServiceServicer):
    def __init__(self, config: CheckpointConfig, store: MetadataStore) -> None:
        self.config = config
        self.layout = Layout(config.data_dir)
        self.index = Index(store, self.layout)
        self.ledger = SpaceLedger(
            config.data_dir, config.quota_bytes, config.min_free_bytes, self.layout.used_bytes
        )
        waiting, wait_s = config.max_waiting_streams, config.stream_wait_seconds
        self.save_gate = StreamGate("save", config.max_save_streams, waiting, wait_s)
        self.load_gate = StreamGate("load", config.max_load_streams, waiting, wait_s)
        self.bytes_moved = telemetry.meter("dsv3.checkpoint").create_counter(
            "dsv3_checkpoint_bytes", unit="By", description="bytes saved (part files) and loaded (tensors)"
        )
        streams = config.max_save_streams + config.max_load_streams
        self._data_pool = ThreadPoolExecutor(streams + 4, thread_name_prefix="ckpt-data")
        self._write_pool = ThreadPoolExecutor(config.max_save_streams, thread_name_prefix="ckpt-write")
        self._job_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def _present(self, job: str, step: int) -> bool:
        """Whether job@step is committed on disk: an index entry without it (a delete racing an index
        rebuild, an index write whose reply was lost) is not shown."""
        return self.layout.committed(job, step).is_dir()

    async def _disk(self, fn: Callable[..., T], *args: Any) -> T:
        return await run_to_end(self._data_pool, fn, *args)

    async def recover(self) -> None:
        manifests = await self._disk(self.layout.recover)
        added, removed = await self.index.rebuild(manifests)
        log.info(
            "recovered %d committed checkpoints (index: %d added, %d stale removed)",
            len(manifests),
            added,
            removed,
        )

    async def expire_pending(self) -> None:
        """Forever: discard uncommitted steps nobody has written to for `pending_ttl_seconds`."""
        ttl = self.config.pending_ttl_seconds
        while ttl:
            await asyncio.sleep(min(ttl / 2, 30.0))
            for job, step in await self._disk(self.layout.expire_pending, ttl):
                log.info("discarded %s@%d: uncommitted for more than %gs", job, step, ttl)

    def close(self) -> None:
        self._data_pool.shutdown(wait=False, cancel_futures=True)
        self._write_pool.shutdown(wait=False, cancel_futures=True)
        self.index.close()

    # ---- save -----------------------------------------------------------------------------------
    async def Save(self, request_iterator, context):
        async with _status_errors(context), self.save_gate.slot():
            first = _parsed(await anext(aiter(request_iterator), None))
            if not isinstance(first, checkpoint_pb2.SaveRequest) or first.WhichOneof("kind") != "header":
                raise names.InvalidRequest("a Save stream must start with a SaveHeader")
            session = self._session(first.header)
            try:
                await self._disk(session.open)
                await self._receive(session, request_iterator)
                written = await self._disk(session.finish)
            finally:
                await self._disk(session.close)
            self.bytes_moved.add(written, {"direction": "save"})
            return checkpoint_pb2.SaveResponse(bytes_written=written)

    async def _receive(self, session: SaveSession, request_iterator) -> None:
        """Write chunks as they come; chunk n is verified and staged in a thread while n+1 arrives."""
        loop = asyncio.get_running_loop()
        staging: asyncio.Future[None] | None = None
        try:
            async for request in request_iterator:
                chunk = self._checked_chunk(request)
                if staging is not None:
                    await finish(staging)
                staging = loop.run_in_executor(
                    self._data_pool, session.write, chunk.tensor_index, chunk.offset, chunk.data, chunk.crc32
                )
            if staging is not None:
                await finish(staging)
        finally:
            if staging is not None and await settle(staging):  # never clean up under a running write
                raise asyncio.CancelledError
            if staging is not None and staging.done() and not staging.cancelled():
                staging.exception()  # retrieved: an error was already raised or superseded

    def _checked_chunk(
        self, request: wire.RawChunk | checkpoint_pb2.SaveRequest | wire.Malformed
    ) -> wire.RawChunk:
        """The chunk as a view of its frame (a chunk the fast codec did not read is converted once)."""
        request = _parsed(request)
        if isinstance(request, checkpoint_pb2.SaveRequest):
            if request.WhichOneof("kind") != "chunk":
                raise names.InvalidRequest("only one SaveHeader is allowed per stream")
            chunk = request.chunk
            request = wire.RawChunk(chunk.tensor_index, chunk.offset, memoryview(chunk.data), chunk.crc32)
        if len(request.data) > self.config.max_chunk_bytes:
            raise names.InvalidRequest(
                f"chunk of {len(request.data)} bytes exceeds max_chunk_bytes={self.config.max_chunk_bytes}"
            )
        return request

    def _session(self, header: checkpoint_pb2.SaveHeader) -> SaveSession:
        job, step = names.check_job(header.job), names.check_step(header.step)
        part = names.check_part(header.part)
        num_segments = max(header.num_segments, 1)
        if num_segments > MAX_SEGMENTS or header.segment >= num_segments:
            raise names.InvalidRequest(
                f"segment must be < num_segments <= {MAX_SEGMENTS}, got {header.segment} of {num_segments}"
            )
        entries = []
        for spec in header.tensors:
            names.check_tensor_name(spec.name)
            shape = tuple(spec.shape)
            dtypes.nbytes(spec.dtype, shape)  # validates dtype and dimensions
            entries.append(TensorEntry(spec.name, spec.dtype, shape))
        metadata = names.check_metadata(dict(header.metadata))
        if self.layout.committed(job, step).exists():  # publish checks again, under the step's lock
            raise WrongState(f"{job}@{step} is already committed; delete it before saving again")
        key = PartKey(job, step, part, header.segment, num_segments, header.attempt)
        return SaveSession(self.layout, self.ledger, key, entries, metadata, self._write_pool)

    # ---- commit, list, latest, delete --------------------------------------------------------------
    async def Commit(self, request, context):
        async with _status_errors(context):
            request = _parsed(request)
            job, step = names.check_job(request.job), names.check_step(request.step)
            num_parts = names.check_num_parts(request.num_parts)
            metadata = names.check_metadata(dict(request.metadata))
            # Run to the end even if the caller goes away: a commit on disk must also be indexed.
            manifest = await finish(self._commit(job, step, num_parts, metadata))
            return checkpoint_pb2.CommitResponse(checkpoint=_info(manifest))

    async def _commit(self, job: str, step: int, num_parts: int, metadata: dict[str, str]) -> dict[str, Any]:
        async with self._job_locks[job]:
            manifest, fresh = await self._disk(self.layout.commit, job, step, num_parts, metadata)
            try:
                await self.index.put(manifest)
            except Exception:
                if fresh:  # not visible unless indexed: the parts go back to pending, commit can be retried
                    await self._disk(self.layout.uncommit, job, step)
                raise
            try:
                await self._apply_retention(job)
            except Exception as exc:  # committed and indexed all the same; the next commit retries it
                log.warning("retention of %s deferred: %s", job, exc)
        return manifest

    async def _apply_retention(self, job: str) -> None:
        steps = await self.index.steps(job)
        for step in sorted(set(steps) - retained(steps, self.config.keep_last, self.config.keep_every)):
            await self._delete(job, step)
            log.info("retention removed %s@%d", job, step)

    async def _delete(self, job: str, step: int) -> str | None:
        await self.index.remove(job, step)  # invisible first, then the bytes
        with contextlib.suppress(NotFound):
            return await self._disk(self.layout.delete, job, step)
        return None

    async def List(self, request, context):
        async with _status_errors(context):
            job = names.check_job(_parsed(request).job)
            infos = []
            for step in await self.index.steps(job):
                manifest = await self.index.get(job, step)
                if manifest is not None and self._present(job, step):  # else deleted meanwhile
                    infos.append(_info(check_manifest(manifest, job, step)))
            return checkpoint_pb2.ListResponse(checkpoints=infos)

    async def Latest(self, request, context):
        async with _status_errors(context):
            job = names.check_job(_parsed(request).job)
            manifest = await self.index.newest(job, lambda step: self._present(job, step))
            if manifest is None:
                return checkpoint_pb2.LatestResponse(found=False)
            manifest = check_manifest(manifest, job, manifest.get("step"))
            return checkpoint_pb2.LatestResponse(found=True, checkpoint=_info(manifest))

    async def Delete(self, request, context):
        async with _status_errors(context):
            request = _parsed(request)
            job, step = names.check_job(request.job), names.check_step(request.step)
            await finish(self._delete_one(job, step))
            return checkpoint_pb2.DeleteResponse()

    async def _delete_one(self, job: str, step: int) -> None:
        async with self._job_locks[job]:
            if await self._delete(job, step) is None:
                raise NotFound(f"no checkpoint {job}@{step}")

    # ---- load -------------------------------------------------------------------------------------
    async def _manifest_for(self, request: checkpoint_pb2.LoadRequest) -> dict[str, Any]:
        job = names.check_job(request.job)
        if request.latest:
            manifest = await self.index.newest(job, lambda step: self._present(job, step))
            if manifest is None:
                raise NotFound(f"job {job!r} has no committed checkpoint")
            return check_manifest(manifest, job, manifest.get("step"))
        step = names.check_step(request.step)
        manifest = await self.index.get(job, step)
        if manifest is None:
            raise NotFound(f"no committed checkpoint {job}@{step}")
        return check_manifest(manifest, job, step)

    async def Load(self, request, context):
        async with _status_errors(context), self.load_gate.slot():
            request = _parsed(request)
            for name in request.names:
                names.check_tensor_name(name)
            num_shards = max(request.num_shards, 1)
            if request.shard >= num_shards:
                raise names.InvalidRequest(f"shard must be < num_shards, got {request.shard} of {num_shards}")
            manifest = await self._manifest_for(request)
            job, step = manifest["job"], manifest["step"]
            selected = select_tensors(manifest, list(request.names))
            runs = balanced_runs([tensor["nbytes"] for _, tensor in selected], num_shards)
            reader = await self._disk(CheckpointReader, self.layout.committed(job, step), f"{job}@{step}")
            try:
                for (part, tensor), run in zip(selected, runs, strict=True):
                    if run != request.shard:
                        continue
                    await self._disk(reader.open_part, part)
                    self.bytes_moved.add(tensor["nbytes"], {"direction": "load"})
                    yield checkpoint_pb2.LoadResponse(
                        tensor=tensor_pb2.TensorSpec(
                            name=tensor["name"], dtype=tensor["dtype"], shape=tensor["shape"]
                        )
                    )
                    # Reading, checksumming and framing run ahead in a thread while the event loop
                    # sends; the frames are `LoadResponse(data=...)` already serialized (see `wire`).
                    frames = prefetched(
                        reader.tensor_chunks(
                            tensor, self.config.read_chunk_bytes, frame=wire.encode_load_data
                        ),
                        2,
                    )
                    try:
                        while (frame := await self._disk(next, frames, None)) is not None:
                            yield frame
                    finally:
                        await self._disk(frames.close)
            finally:
                await self._disk(reader.close)


def add_to_server(servicer: CheckpointServicer, server: grpc.aio.Server) -> None:
    """Register the service; Save and Load use the fast chunk codecs of `wire` (same wire format)."""
    pb = checkpoint_pb2

    def unary(method, request_type, response_type) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=wire.lenient(request_type),
            response_serializer=response_type.SerializeToString,
        )

    handlers = {
        "Save": grpc.stream_unary_rpc_method_handler(
            servicer.Save,
            request_deserializer=wire.deserialize_save_request,
            response_serializer=pb.SaveResponse.SerializeToString,
        ),
        "Load": grpc.unary_stream_rpc_method_handler(
            servicer.Load,
            request_deserializer=wire.lenient(pb.LoadRequest),
            response_serializer=wire.serialize_load_response,
        ),
        "Commit": unary(servicer.Commit, pb.CommitRequest, pb.CommitResponse),
        "List": unary(servicer.List, pb.ListRequest, pb.ListResponse),
        "Latest": unary(servicer.Latest, pb.LatestRequest, pb.LatestResponse),
        "Delete": unary(servicer.Delete, pb.DeleteRequest, pb.DeleteResponse),
    }
    declared = {m.name for m in pb.DESCRIPTOR.services_by_name["CheckpointService"].methods}
    if set(handlers) != declared:  # a method added to checkpoint.proto must be registered here too
        raise RuntimeError(f"handlers {sorted(handlers)} != CheckpointService methods {sorted(declared)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


class _Server(ServiceServer):
    """The bootstrap's server, remembering that a drain began so that index health cannot undo it."""

    draining = False

    def request_stop(self) -> None:
        self.draining = True
        super().request_stop()

    async def index_health(self, alive: bool) -> None:
        if not self.draining:
            log.warning(
                "index %s: health %s",
                "back" if alive else "unavailable",
                "SERVING" if alive else "NOT_SERVING",
            )
            await self.set_serving(alive)


async def serve(config: CheckpointConfig) -> None:
    telemetry.setup("dsv3-checkpoint")
    telemetry.serve_metrics(config.metrics_port)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(config.redis_url, config.data_dir, config.redis_timeout_seconds)
    servicer = CheckpointServicer(config, store)
    server = _Server(
        [SERVICE_NAME],
        [lambda s: add_to_server(servicer, s)],
        config.host,
        config.port,
        max_message_bytes=config.max_chunk_bytes * 2 + (1 << 20),
        # No BDP probing: it grows every connection's HTTP/2 window to megabytes, which gRPC fills with
        # the requests of streams still waiting at the gate (50 waiting streams held ~250 MiB).
        options=[("grpc.http2.bdp_probe", 0)],
    )
    background: list[asyncio.Task[None]] = []

    async def ready() -> None:
        await servicer.recover()
        background.append(asyncio.create_task(servicer.index.watch(server.index_health)))
        background.append(asyncio.create_task(servicer.expire_pending()))

    try:
        await serve_forever(server, ready, config.grace_seconds)
    finally:
        for task in background:
            task.cancel()
        servicer.close()
