"""ExpertShardService over gRPC: decode, validate, call the `SlotStore`, encode.

A large Compute runs in a worker thread (torch releases the GIL), so health checks and Status stay
responsive while it computes; a small one (a decode step's rows, well under a millisecond) runs on the
event loop, where the thread hop would cost more than the work, when torch runs single-threaded here
(else every Compute goes to the worker: one OpenMP team per process). Starts empty and SERVING;
NOT_SERVING while draining on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from dsv3.expert_shard.config import ShardConfig
from dsv3.expert_shard.slots import CapacityError, SlotError, SlotNotLoaded, SlotStore
from dsv3.expert_shard.weights import HfDirectory, WeightSourceError, checkpoint_reader
from dsv3.rpc.v1 import expert_pb2, expert_pb2_grpc, tensor_pb2
from dsv3.serving import registry, telemetry, tensor_codec, threads
from dsv3.serving.server import ServiceServer
from dsv3.serving.server import serve as serve_forever

log = logging.getLogger(__name__)
SERVICE_NAME = "dsv3.rpc.v1.ExpertShardService"
INLINE_ELEMENTS = 1 << 18  # Compute of at most this many row elements runs on the event loop itself


def _decode(field: str, message: tensor_pb2.Tensor):
    try:
        return tensor_codec.decode(message)
    except (tensor_codec.TensorCodecError, ValueError) as exc:
        raise SlotError(field, str(exc)) from None


def _slots(messages) -> list[tuple[int, int]]:
    return [(s.layer, s.expert) for s in messages]


class ExpertShardServicer(expert_pb2_grpc.ExpertShardServiceServicer):
    def __init__(self, config: ShardConfig, store: SlotStore) -> None:
        self.config = config
        self.store = store
        # large Computes get torch's threads; the loop's inline ones (and loading) run on one
        self.compute_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="compute", initializer=threads.use_for_compute
        )
        threads.use_for_bookkeeping()
        # small Computes run on the loop itself, but only while torch is single-threaded here: with
        # more threads they would give the loop an OpenMP team of its own next to the compute thread's
        self.inline_elements = INLINE_ELEMENTS if threads.compute_threads() == 1 else 0
        self.load_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="load", initializer=threads.use_for_bookkeeping
        )
        meter = telemetry.meter("dsv3.expert_shard")
        self.rows_computed = meter.create_counter("dsv3_shard_rows", description="rows computed, per layer")
        self.compute_time = meter.create_histogram("dsv3_shard_compute_duration", unit="s")

    @staticmethod
    def _code(exc: Exception) -> grpc.StatusCode:
        if isinstance(exc, SlotNotLoaded):
            return grpc.StatusCode.FAILED_PRECONDITION
        if isinstance(exc, CapacityError):
            return grpc.StatusCode.RESOURCE_EXHAUSTED
        if isinstance(exc, SlotError | WeightSourceError):
            return grpc.StatusCode.INVALID_ARGUMENT
        return grpc.StatusCode.NOT_FOUND if isinstance(exc, grpc.RpcError) else grpc.StatusCode.INTERNAL

    async def _fail(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        await context.abort(self._code(exc), str(exc))

    async def _compute(self, request: expert_pb2.ComputeRequest) -> expert_pb2.ComputeResponse:
        """One request's rows through the slots; raises SlotError (naming the field) when it does not fit."""
        started = time.perf_counter()
        try:
            rows = _decode("rows", request.rows)
            weights = _decode("row_weights", request.row_weights)
            args = (request.layer, list(request.experts), list(request.counts), rows, weights)
            if rows.numel() <= self.inline_elements:  # a decode step's rows: a hop would cost more
                out = self.store.compute(*args)
            else:
                out = await asyncio.get_running_loop().run_in_executor(
                    self.compute_pool, self.store.compute, *args
                )
        except ValueError as exc:
            raise exc if isinstance(exc, SlotError) else SlotError("rows", str(exc)) from None
        layer = {"layer": str(request.layer)}
        self.rows_computed.add(rows.shape[0], layer)
        self.compute_time.record(time.perf_counter() - started, layer)
        return expert_pb2.ComputeResponse(rows=tensor_codec.encode(out))

    async def Compute(self, request, context):
        try:
            return await self._compute(request)
        except SlotError as exc:
            await self._fail(context, exc)

    async def ComputeStream(self, request_iterator, context):
        async for request in request_iterator:
            try:
                yield await self._compute(request)
            except SlotError as exc:  # refused, answered in order; the stream goes on
                error = expert_pb2.ComputeError(code=self._code(exc).value[0], message=str(exc))
                yield expert_pb2.ComputeResponse(error=error)

    async def LoadSlots(self, request, context):
        try:
            kind = request.WhichOneof("source")
            if kind is None:
                raise SlotError("source", "name hf_directory or checkpoint")
            if kind == "hf_directory":
                loop = asyncio.get_running_loop()
                read = (
                    await loop.run_in_executor(self.load_pool, HfDirectory, request.hf_directory.path)
                ).read
            else:
                src = request.checkpoint
                read = checkpoint_reader(self.config.checkpoint, src.job, None if src.latest else src.step)
            dtype = tensor_codec.torch_dtype(request.dtype) if request.dtype else tensor_codec.torch_dtype(3)
            loop = asyncio.get_running_loop()
            loaded = await loop.run_in_executor(
                self.load_pool,
                self.store.load,
                _slots(request.slots),
                read,
                request.hidden_size,
                request.moe_intermediate_size,
                dtype,
            )
        except grpc.RpcError as exc:  # from the checkpoint service: pass its status on
            await context.abort(exc.code(), f"checkpoint service: {exc.details()}")
        except (SlotError, WeightSourceError, tensor_codec.TensorCodecError) as exc:
            await self._fail(context, exc)
        log.info("loaded %d slots (%d held)", len(loaded), len(self.store.held))
        return expert_pb2.LoadSlotsResponse(loaded=[expert_pb2.SlotId(layer=l, expert=e) for l, e in loaded])

    async def DropSlots(self, request, context):
        dropped = self.store.drop(_slots(request.slots))
        return expert_pb2.DropSlotsResponse(
            dropped=[expert_pb2.SlotId(layer=l, expert=e) for l, e in dropped]
        )

    async def Status(self, request, context):
        tokens = self.store.take_tokens()
        return expert_pb2.ShardStatusResponse(
            shard_id=self.config.shard_id,
            capacity=self.config.capacity,
            slots=[
                expert_pb2.SlotStatus(slot=expert_pb2.SlotId(layer=l, expert=e), tokens=n)
                for (l, e), n in tokens.items()
            ],
        )


async def serve(config: ShardConfig) -> None:
    telemetry.setup("dsv3-expert-shard")
    # a stream lives as long as its router: no server span for it (sampled steps use unary Compute)
    telemetry.trace_in_handler(f"/{SERVICE_NAME}/ComputeStream")
    telemetry.serve_metrics(config.metrics_port)
    store = SlotStore(config.capacity, config.device)
    servicer = ExpertShardServicer(config, store)
    server = ServiceServer(
        [SERVICE_NAME],
        [lambda s: expert_pb2_grpc.add_ExpertShardServiceServicer_to_server(servicer, s)],
        config.host,
        config.port,
        max_message_bytes=config.max_message_bytes,
    )
    stop_announcing = asyncio.Event()
    announcer: asyncio.Task | None = None

    async def ready() -> None:
        nonlocal announcer
        if config.redis_url:
            address = config.advertise_address or f"{socket.gethostname()}:{server.port}"
            announcer = asyncio.create_task(
                registry.announce(
                    config.redis_url, config.shard_id, address, config.registry_ttl_seconds, stop_announcing
                )
            )

    try:
        await serve_forever(server, ready, config.grace_seconds)
    finally:
        stop_announcing.set()
        if announcer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(announcer, 3)
