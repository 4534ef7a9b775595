"""The CheckpointService gRPC servicer: validation, status codes, and the asyncio side of storage.

Disk work runs in threads (`asyncio.to_thread`) so concurrent writers overlap and health checks stay
responsive during long fsyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import grpc
import redis

from dsv3.checkpoint import names, wire
from dsv3.checkpoint.config import CheckpointConfig, retained
from dsv3.checkpoint.prefetch import prefetched
from dsv3.checkpoint.split import balanced_runs
from dsv3.checkpoint.storage import (
    CorruptData,
    Layout,
    NotFound,
    PartWriter,
    TensorEntry,
    WrongState,
    read_tensor_chunks,
    select_tensors,
    verify_part_file,
)
from dsv3.checkpoint.store import MetadataStore, open_store, reconcile
from dsv3.rpc.v1 import checkpoint_pb2, checkpoint_pb2_grpc, tensor_pb2
from dsv3.serving import dtypes
from dsv3.serving.server import ServiceServer
from dsv3.serving.server import serve as serve_forever

log = logging.getLogger(__name__)
MAX_SEGMENTS = 64  # streams per part; more only costs file handles and staging buffers
SERVICE_NAME = checkpoint_pb2.DESCRIPTOR.services_by_name["CheckpointService"].full_name


class StorageFull(Exception):
    """Saving would exceed the quota or the free disk space (RESOURCE_EXHAUSTED)."""


_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the data volume",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the data volume is read-only",
    errno.EACCES: "the data directory is not writable",
    errno.EPERM: "the data directory is not writable",
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status an exception maps to, or None for an unexpected error."""
    if isinstance(exc, names.InvalidRequest | dtypes.TensorCodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, WrongState):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, CorruptData):
        return grpc.StatusCode.DATA_LOSS, str(exc)
    if isinstance(exc, StorageFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{_DISK_ERRNOS[exc.errno]} ({exc.strerror})"
    if isinstance(exc, redis.RedisError):
        return grpc.StatusCode.UNAVAILABLE, f"metadata store unavailable: {exc}"
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
        )
        for p in manifest["parts"]
    ]
    return checkpoint_pb2.CheckpointInfo(
        job=manifest["job"],
        step=manifest["step"],
        parts=parts,
        total_bytes=manifest["total_bytes"],
        metadata=manifest["metadata"],
        committed_unix_ms=manifest["committed_unix_ms"],
    )


class CheckpointServicer(checkpoint_pb2_grpc.CheckpointServiceServicer):
    def __init__(self, config: CheckpointConfig, store: MetadataStore) -> None:
        self.config = config
        self.layout = Layout(config.data_dir)
        self.store = store
        self._job_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def recover(self) -> None:
        manifests = await asyncio.to_thread(self.layout.recover)
        added, removed = await asyncio.to_thread(reconcile, self.store, manifests)
        log.info(
            "recovered %d committed checkpoints (index: %d added, %d stale removed)",
            len(manifests),
            added,
            removed,
        )

    # ---- save -----------------------------------------------------------------------------------
    async def Save(self, request_iterator, context):
        writer: PartWriter | None = None
        staging: asyncio.Future[None] | None = None  # chunk n is verified and staged while n+1 arrives
        async with _status_errors(context):
            try:
                first = await anext(aiter(request_iterator), None)
                if isinstance(first, wire.Malformed):
                    raise names.InvalidRequest(first.reason)
                if not isinstance(first, checkpoint_pb2.SaveRequest) or first.WhichOneof("kind") != "header":
                    raise names.InvalidRequest("a Save stream must start with a SaveHeader")
                writer = await self._open_part(first.header)
                async for request in request_iterator:
                    chunk = self._checked_chunk(request)
                    if staging is not None:
                        await staging
                    staging = asyncio.ensure_future(
                        asyncio.to_thread(
                            writer.write_chunk, chunk.tensor_index, chunk.offset, chunk.data, chunk.crc32
                        )
                    )
                if staging is not None:
                    await staging
                await asyncio.to_thread(writer.finish)
                written, writer = writer.total_bytes, None
                return checkpoint_pb2.SaveResponse(bytes_written=written)
            finally:
                if staging is not None and not staging.done():
                    with contextlib.suppress(Exception):
                        await staging  # never abort under a thread still writing
                if writer is not None:
                    await asyncio.to_thread(writer.abort)

    def _checked_chunk(
        self, request: wire.RawChunk | checkpoint_pb2.SaveRequest | wire.Malformed
    ) -> wire.RawChunk:
        """The chunk as a view of its frame (a chunk the fast codec did not read is converted once)."""
        if isinstance(request, wire.Malformed):
            raise names.InvalidRequest(request.reason)
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

    async def _open_part(self, header: checkpoint_pb2.SaveHeader) -> PartWriter:
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
        if self.layout.committed(job, step).exists():
            raise WrongState(f"{job}@{step} is already committed; delete it before saving again")
        needed = sum(e.nbytes for e in entries)
        await self._check_space(needed)
        return await asyncio.to_thread(
            PartWriter,
            self.layout.pending(job, step),
            part,
            entries,
            dict(header.metadata),
            header.segment,
            num_segments,
        )

    async def _check_space(self, needed: int) -> None:
        if self.config.quota_bytes:
            used = await asyncio.to_thread(self.layout.used_bytes)
            if used + needed > self.config.quota_bytes:
                raise StorageFull(
                    f"saving {needed} bytes would exceed the quota of {self.config.quota_bytes} "
                    f"bytes ({used} in use)"
                )
        free = shutil.disk_usage(self.config.data_dir).free
        if free - needed < self.config.min_free_bytes:
            raise StorageFull(
                f"saving {needed} bytes would leave {free - needed} bytes free on the data volume "
                f"(minimum {self.config.min_free_bytes})"
            )

    # ---- commit, list, latest, delete --------------------------------------------------------------
    async def Commit(self, request, context):
        async with _status_errors(context):
            job, step = names.check_job(request.job), names.check_step(request.step)
            if request.num_parts <= 0:
                raise names.InvalidRequest(f"num_parts must be >= 1, got {request.num_parts}")
            async with self._job_locks[job]:
                manifest = await asyncio.to_thread(
                    self.layout.commit, job, step, request.num_parts, dict(request.metadata)
                )
                await asyncio.to_thread(self.store.put, manifest)
                await self._apply_retention(job)
            return checkpoint_pb2.CommitResponse(checkpoint=_info(manifest))

    async def _apply_retention(self, job: str) -> None:
        steps = await asyncio.to_thread(self.store.steps, job)
        for step in sorted(set(steps) - retained(steps, self.config.keep_last, self.config.keep_every)):
            await self._delete(job, step)
            log.info("retention removed %s@%d", job, step)

    async def _delete(self, job: str, step: int) -> None:
        await asyncio.to_thread(self.store.remove, job, step)  # invisible first, then the bytes
        with contextlib.suppress(NotFound):
            await asyncio.to_thread(self.layout.delete, job, step)

    async def List(self, request, context):
        async with _status_errors(context):
            job = names.check_job(request.job)
            steps = await asyncio.to_thread(self.store.steps, job)
            manifests = [await asyncio.to_thread(self.store.get, job, s) for s in steps]
            return checkpoint_pb2.ListResponse(checkpoints=[_info(m) for m in manifests if m])

    async def Latest(self, request, context):
        async with _status_errors(context):
            job = names.check_job(request.job)
            steps = await asyncio.to_thread(self.store.steps, job)
            if not steps:
                return checkpoint_pb2.LatestResponse(found=False)
            manifest = await asyncio.to_thread(self.store.get, job, steps[-1])
            return checkpoint_pb2.LatestResponse(found=manifest is not None, checkpoint=_info(manifest or {}))

    async def Delete(self, request, context):
        async with _status_errors(context):
            job, step = names.check_job(request.job), names.check_step(request.step)
            async with self._job_locks[job]:
                if await asyncio.to_thread(self.store.get, job, step) is None:
                    raise NotFound(f"no committed checkpoint {job}@{step}")
                await self._delete(job, step)
            return checkpoint_pb2.DeleteResponse()

    # ---- load -------------------------------------------------------------------------------------
    async def _manifest_for(self, request: checkpoint_pb2.LoadRequest) -> dict[str, Any]:
        job = names.check_job(request.job)
        if request.latest:
            steps = await asyncio.to_thread(self.store.steps, job)
            if not steps:
                raise NotFound(f"job {job!r} has no committed checkpoint")
            step = steps[-1]
        else:
            step = names.check_step(request.step)
        manifest = await asyncio.to_thread(self.store.get, job, step)
        if manifest is None:
            raise NotFound(f"no committed checkpoint {job}@{step}")
        return manifest

    async def Load(self, request, context):
        async with _status_errors(context):
            for name in request.names:
                names.check_tensor_name(name)
            num_shards = max(request.num_shards, 1)
            if request.shard >= num_shards:
                raise names.InvalidRequest(f"shard must be < num_shards, got {request.shard} of {num_shards}")
            manifest = await self._manifest_for(request)
            directory = self.layout.committed(manifest["job"], manifest["step"])
            selected = select_tensors(manifest, list(request.names))
            runs = balanced_runs([tensor["nbytes"] for _, tensor in selected], num_shards)
            verified: set[str] = set()  # part files whose header was checked during this load
            for (part, tensor), run in zip(selected, runs, strict=True):
                if run != request.shard:
                    continue
                if part["file"] not in verified:
                    await asyncio.to_thread(verify_part_file, directory, part)
                    verified.add(part["file"])
                yield checkpoint_pb2.LoadResponse(
                    tensor=tensor_pb2.TensorSpec(
                        name=tensor["name"], dtype=tensor["dtype"], shape=tensor["shape"]
                    )
                )
                # Reading, checksumming and framing run ahead in a thread while the event loop sends;
                # the frames are `LoadResponse(data=...)` already serialized (see `wire`).
                frames = prefetched(
                    read_tensor_chunks(
                        directory, part, tensor, self.config.read_chunk_bytes, frame=wire.encode_load_data
                    ),
                    2,
                )
                while (frame := await asyncio.to_thread(next, frames, None)) is not None:
                    yield frame


def add_to_server(servicer: CheckpointServicer, server: grpc.aio.Server) -> None:
    """Register the service; Save and Load use the fast chunk codecs of `wire` (same wire format)."""
    pb = checkpoint_pb2

    def unary(method, request_type, response_type) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=request_type.FromString,
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
            request_deserializer=pb.LoadRequest.FromString,
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


async def serve(config: CheckpointConfig) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(config.redis_url, config.data_dir)
    servicer = CheckpointServicer(config, store)
    server = ServiceServer(
        [SERVICE_NAME],
        [lambda s: add_to_server(servicer, s)],
        config.host,
        config.port,
        max_message_bytes=config.max_chunk_bytes * 2 + (1 << 20),
    )
    try:
        await serve_forever(server, servicer.recover, config.grace_seconds)
    finally:
        store.close()
