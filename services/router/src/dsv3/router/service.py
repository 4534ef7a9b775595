"""RouterService over gRPC: decode, validate, hand to the engine / model thread, encode.

Start-up: load the dense weights, find the shards (static list, DNS, or the Redis registry), place every
expert (`--replicas` copies where slots allow) and have the shards load them, then SERVING. Discovery
keeps running: shards that appear join (and get slots), ones that vanish from DNS or the registry leave.
Placement follows the observed expert load (`dsv3.router.rebalance`): on every change of the shard set,
every --rebalance-interval seconds, and on a `Rebalance` call, applied without stopping the engine.
The OpenAI-compatible HTTP API (`http_api`, `--http-port`) runs in the same event loop from the start
(its /health says 503 until the shards are ready) and feeds the same engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from dsv3.model import ModelConfig
from dsv3.router.config import RouterConfig
from dsv3.router.dense import load_from_checkpoint, load_from_directory
from dsv3.router.engine import Engine, RequestError, SamplingParams
from dsv3.router.http_api import ServedModel, create_app, start_http
from dsv3.router.load_window import LoadWindow, run_sampling
from dsv3.router.metrics import RouterMetrics
from dsv3.router.placement import balancedness
from dsv3.router.pool import ExpertUnavailable, LoadSpec, ShardPool
from dsv3.router.remote import attach, mtp_layers
from dsv3.rpc.v1 import expert_pb2, router_pb2, router_pb2_grpc
from dsv3.serving import registry, telemetry, tensor_codec, threads
from dsv3.serving.server import ServiceServer
from dsv3.serving.server import serve as serve_forever
from dsv3.tokenizer import Tokenizer, load_tokenizer, model_tokenizer

log = logging.getLogger(__name__)
GENERATE = "/dsv3.rpc.v1.RouterService/Generate"
SERVICE_NAME = "dsv3.rpc.v1.RouterService"


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, engine: Engine, pool: ShardPool, executor: ThreadPoolExecutor) -> None:
        self.engine = engine
        self.pool = pool
        self.executor = executor

    async def _abort_for(self, context, exc: BaseException) -> None:
        if isinstance(exc, RequestError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(exc, ExpertUnavailable):
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        log.exception("request failed", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    async def Forward(self, request, context):
        try:
            try:
                ids = tensor_codec.decode(request.input_ids)
            except (tensor_codec.TensorCodecError, ValueError) as exc:
                raise RequestError("input_ids", str(exc)) from None
            if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
                raise RequestError(
                    "input_ids",
                    f"must be a non-empty integer [batch, tokens], got {ids.dtype} {list(ids.shape)}",
                )
            vocab = self.engine.vocab
            if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                raise RequestError(
                    "input_ids", f"ids must lie in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}"
                )
            model = self.engine.model

            def work() -> torch.Tensor:
                with torch.no_grad():
                    return (
                        model(ids.long().to(model.lm_head.weight.device), compute_mtp=False)
                        .logits.float()
                        .cpu()
                    )

            logits = await asyncio.get_running_loop().run_in_executor(
                self.executor, threads.running_with(0, work)
            )
        except Exception as exc:
            await self._abort_for(context, exc)
        return router_pb2.ForwardResponse(logits=tensor_codec.encode(logits))

    async def Generate(self, request, context):
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            top_k=request.top_k,
            stop=tuple(request.stop),
            seed=request.seed if request.HasField("seed") else None,
            ignore_eos=request.ignore_eos,
        )
        span, trace = telemetry.start_server_span(GENERATE, context.invocation_metadata())
        try:
            job = self.engine.submit(list(request.prompt_ids), params, trace=trace)
        except RequestError as exc:
            if span is not None:
                span.end()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        index = 0
        try:
            async for event in self.engine.events(job):
                reply = router_pb2.GenerateResponse(token=event.token, index=index)
                if event.last:  # the final message carries how the request ended and its drafts
                    reply.last = True
                    reply.finish_reason = job.finish_reason or ""
                    reply.draft_tokens = job.drafted
                    reply.accepted_draft_tokens = job.accepted
                yield reply
                index += 1
        except Exception as exc:
            await self._abort_for(context, exc)
        finally:
            job.cancelled = True  # a client that went away frees its slot at the next step
            if span is not None:
                span.end()

    async def Placement(self, request, context):
        shards = []
        for shard in sorted(self.pool.shards.values(), key=lambda s: s.address):
            shards.append(
                router_pb2.ShardInfo(
                    address=shard.address,
                    shard_id=shard.shard_id,
                    live=shard.live,
                    slots=[expert_pb2.SlotId(layer=l, expert=e) for l, e in sorted(shard.held)],
                    tokens=shard.rows_sent,
                    compute_calls=shard.calls,
                )
            )
        live = [s for s in self.pool.shards.values() if s.live]
        loads = [float(s.rows_sent) for s in live]
        if not any(loads):
            loads = [float(len(s.held)) for s in live]
        placer = self.pool.placer
        return router_pb2.PlacementResponse(
            shards=shards,
            balancedness=balancedness(loads),
            replicas=self.pool.replicas,
            version=placer.version,
            last_change=_change_message(placer.last),
            window_balancedness=placer.window_balancedness(),
            rebalances=placer.changes,
        )

    async def Rebalance(self, request, context):
        tolerance = request.tolerance if request.HasField("tolerance") else None
        if tolerance is not None and not 0 <= tolerance < 10:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"tolerance: must be in [0, 10), got {tolerance}"
            )
        change = await self.pool.placer.rebalance("request", tolerance)
        return router_pb2.RebalanceResponse(change=_change_message(change))


def _change_message(change) -> router_pb2.PlacementChange | None:
    if change is None:
        return None
    return router_pb2.PlacementChange(
        version=change.version,
        reason=change.reason,
        slots_moved=change.slots_moved,
        balancedness_before=change.balancedness_before,
        balancedness_after=change.balancedness_after,
        seconds=change.seconds,
    )


async def _discover(config: RouterConfig) -> set[str]:
    if config.shards:
        return set(config.static_shards)
    if config.shards_dns:
        name, port = config.shards_dns.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
        except OSError:
            return set()
        return {f"{info[4][0]}:{port}" for info in infos}
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(config.redis_url, socket_timeout=2)
    try:
        return set((await registry.list_shards(client)).values())
    except Exception as exc:
        log.warning("registry: %s", exc)
        return set()
    finally:
        await client.aclose()


async def _discovery_loop(config: RouterConfig, pool: ShardPool) -> None:
    while True:
        await asyncio.sleep(config.discovery_interval_seconds)
        found = await _discover(config)
        if found or not config.redis_url:
            await pool.set_members(found, forget_missing=not config.shards)


def _load_model(config: RouterConfig):
    if config.model_dir is not None:
        return load_from_directory(config.model_dir, config.device)
    step = None if config.step < 0 else config.step
    if Path(config.model_config).is_file():
        model_config = ModelConfig.from_hf_config(config.model_config)
    else:
        model_config = ModelConfig.flavour(config.model_config)
    return load_from_checkpoint(config.checkpoint, config.job, step, model_config, config.device)


def _load_tokenizer(config: RouterConfig, vocab_size: int) -> Tokenizer:
    tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else model_tokenizer(config.model_dir)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer: vocabulary of {tokenizer.vocab_size} does not fit the model's "
            f"vocab_size {vocab_size}"
        )
    return tokenizer


async def serve(config: RouterConfig) -> None:
    telemetry.setup("dsv3-router")
    telemetry.trace_in_handler(GENERATE)  # one span per stream, not the interceptor's per message
    # the model thread keeps torch's threads; the event loop (shard fan-out, encoding) runs on one
    executor = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="model", initializer=threads.use_for_compute
    )
    threads.use_for_bookkeeping()
    loop = asyncio.get_running_loop()
    model, layers = await loop.run_in_executor(executor, _load_model, config)
    mc = model.config
    tokenizer = _load_tokenizer(config, mc.vocab_size)
    speculative = config.speculative and len(model.mtp) > 0
    if speculative:  # the MTP block's routed experts live on the shards too
        layers = layers + mtp_layers(model)
    step = None if config.step < 0 else config.step
    if config.checkpoint is not None and step is None:
        from dsv3.checkpoint import CheckpointClient

        with CheckpointClient(config.checkpoint) as client:
            step = client.latest(config.job)  # every shard loads the same step
    spec = LoadSpec(
        mc.hidden_size,
        mc.moe_intermediate_size,
        hf_directory=str(Path(config.model_dir).resolve()) if config.model_dir else None,
        checkpoint_job=config.job,
        checkpoint_step=step,
    )
    slots = [(index, e) for index, _ in layers for e in range(mc.n_routed_experts)]
    pool = ShardPool(
        slots,
        spec,
        config.replicas,
        config.shard_timeout_seconds,
        config.load_timeout_seconds,
        config.max_message_bytes,
        config.redundant_experts,
        config.rebalance_tolerance,
    )
    window = LoadWindow([moe.dispatcher for _, moe in layers], config.load_window_seconds)
    pool.placer.window = window

    async def between_steps(switch) -> None:  # the model thread runs one step at a time
        await loop.run_in_executor(executor, switch)

    pool.placer.between_steps = between_steps
    attach(layers, pool, loop)
    max_length = config.max_length or min(mc.max_position_embeddings, 4096)
    engine = Engine(
        model,
        config.max_batch,
        max_length,
        executor,
        eos_id=tokenizer.eos_id,
        speculative=speculative,
        decode_threads=config.decode_threads,
    )
    log.info("speculative decoding (MTP drafts): %s", "on" if speculative else "off")
    servicer = RouterServicer(engine, pool, executor)
    server = ServiceServer(
        [SERVICE_NAME],
        [lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, s)],
        config.host,
        config.port,
        max_message_bytes=config.max_message_bytes,
    )
    tasks: list[asyncio.Task] = []
    started = asyncio.Event()

    def unavailable() -> str | None:
        """Why the HTTP API cannot serve now (503), or None."""
        if not started.is_set():
            return "the router is starting"
        live = [s for s in pool.shards.values() if s.live]
        if not live:
            return "no live expert shard"
        uncovered = sum(not any(slot in s.held for s in live) for slot in slots)
        return f"{uncovered} experts have no live replica" if uncovered else None

    http = None
    if config.http_port:
        served = ServedModel(config.model_name, engine, tokenizer, unavailable)
        http, http_task = await start_http(
            create_app(served, RouterMetrics(engine, pool.placer, pool.shards)), config.host, config.http_port
        )
        log.info("HTTP API (OpenAI-compatible) on port %d, model %r", config.http_port, served.name)

    async def ready() -> None:
        deadline = loop.time() + config.startup_timeout_seconds
        while True:
            await pool.set_members(await _discover(config), forget_missing=False)
            live = [s for s in pool.shards.values() if s.live]
            uncovered = [slot for slot in slots if not any(slot in s.held for s in live)]
            if live and not uncovered:  # every expert has a live replica (a down shard may rejoin later)
                break
            if loop.time() > deadline:
                raise RuntimeError(
                    f"shards not ready after {config.startup_timeout_seconds}s: "
                    f"{len(pool.shards)} found, {len(uncovered)} slots uncovered"
                )
            await asyncio.sleep(0.2)
        log.info("placement: %s", {a: len(s.held) for a, s in pool.shards.items()})
        tasks.append(asyncio.create_task(engine.run()))
        tasks.append(asyncio.create_task(_discovery_loop(config, pool)))
        tasks.append(asyncio.create_task(run_sampling(window)))
        if config.rebalance_interval > 0:
            tasks.append(asyncio.create_task(pool.placer.run_every(config.rebalance_interval)))
        started.set()

    try:
        await serve_forever(server, ready, config.grace_seconds)
    finally:
        if http is not None:
            http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(http_task, config.grace_seconds + 1)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await pool.close()
        executor.shutdown(wait=False, cancel_futures=True)
