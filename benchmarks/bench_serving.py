"""Serving throughput: transformers' `generate`, dsv3 in-process `generate`, and router + 2 expert shards.

All rows in one run, on the `bench_model.py` config with the same weights, 128-token prompts:
- prefill tokens/s and decode tokens/s at batch 1, 16 and 64, for (a) transformers'
  `DeepseekV3ForCausalLM.generate` in-process, (b) dsv3's `generation.generate` in-process, (c) the
  router with 2 expert shards (real processes on loopback, B concurrent Generate streams). Contenders
  alternate within each repeat so machine noise hits all alike; the best repeat of each is kept.
  Prefill = B * 128 / (time to every sequence's first token); decode = B * (N - 1) / (time from
  there to the last token); transformers' first-token time comes from a `streamer`.
- per-MoE-layer dispatch overhead: one layer's rows of a batch-64 decode step (64 x 6 rows) through
  the router's `ShardPool.compute` to the 2 shards, less the shards' compute, against a plain gRPC
  echo of the same bytes to 2 echo processes (the transport floor): as unary calls (the floor the goal
  names) and as messages on open streams (the transport `ShardPool` uses).

    python benchmarks/bench_serving.py [--repeats 3] [--new-tokens 16] [--out benchmarks/out/serving.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import BENCH_CONFIG

from dsv3.generation import generate
from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.rpc.v1 import router_pb2, router_pb2_grpc
from dsv3.serving.ports import free_port

BATCHES = (1, 16, 64)
PROMPT = 128
ECHO = "/bench.Echo/Echo"
ECHO_STREAM = "/bench.Echo/EchoStream"


def echo_server(port: int) -> None:
    """A gRPC server that returns the request bytes: the transport floor, as unary calls (`Echo`) and as
    messages on one open bidirectional stream (`EchoStream`, the transport the router's Compute uses)."""

    async def echo_stream(requests, context):
        async for request in requests:
            yield request

    async def run() -> None:
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo",
            {
                "Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req),
                "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
            },
        )
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 1 << 28), ("grpc.max_send_message_length", 1 << 28)]
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def _spawn(
    args: list[str], log: Path, threads: int = 1, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`python *args` with its output in `log`; `env`: variables added to this process's environment."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **(env or {}))
    return subprocess.Popen([sys.executable, *args], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def _wait_serving(address: str, timeout: float = 120) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{address} not serving")


async def _router_batch(address: str, prompts: list[list[int]], new: int) -> tuple[float, float]:
    """(seconds until every stream has its first token, seconds from then to the last token)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        firsts: list[float] = []

        async def one(prompt: list[int]) -> int:
            n = 0
            request = router_pb2.GenerateRequest(prompt_ids=prompt, max_tokens=new, ignore_eos=True)
            async for _ in stub.Generate(request, timeout=600):
                n += 1
                if n == 1:
                    firsts.append(time.perf_counter())
            return n

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        end = time.perf_counter()
    assert counts == [new] * len(prompts), counts
    return max(firsts) - start, end - max(firsts)


class _FirstTokenClock:
    """A transformers streamer that notes when the first new tokens arrive (after the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first = 0.0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _contenders(ours, theirs, router: str):
    """name -> fn(ids [B, T], new tokens) -> (prefill seconds, decode seconds)."""

    def hf(ids: torch.Tensor, n: int) -> tuple[float, float]:
        clock = _FirstTokenClock()
        start = time.perf_counter()
        with torch.no_grad():
            theirs.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        end = time.perf_counter()
        return clock.first - start, end - clock.first

    @torch.no_grad()
    def dsv3(ids: torch.Tensor, n: int) -> tuple[float, float]:
        # `generation.generate`'s loop, with a clock after the prefill
        start = time.perf_counter()
        cache = ours.new_cache(ids.shape[0], ids.shape[1] + n)
        next_ids = ours(ids, cache=cache).logits[:, -1].argmax(-1)
        first = time.perf_counter()
        for _ in range(n - 1):
            next_ids = ours(next_ids[:, None], cache=cache).logits[:, -1].argmax(-1)
        return first - start, time.perf_counter() - first

    def routed(ids: torch.Tensor, n: int) -> tuple[float, float]:
        return asyncio.run(_router_batch(router, ids.tolist(), n))

    return {"transformers": hf, "dsv3": dsv3, "router+2 shards": routed}


async def _dispatch_overhead(shards: list[str], hf_dir: Path, config: ModelConfig, repeats: int) -> dict:
    from dsv3.kernels import ops
    from dsv3.router.pool import LoadSpec, ShardPool

    layer = config.first_k_dense_replace
    slots = [(layer, e) for e in range(config.n_routed_experts)]
    pool = ShardPool(
        slots, LoadSpec(config.hidden_size, config.moe_intermediate_size, str(hf_dir)), 2, 30, 300, 1 << 28
    )
    await pool.set_members(set(shards), forget_missing=False)
    tokens, k, experts = 64, config.num_experts_per_tok, config.n_routed_experts
    ids = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    counts = torch.bincount(ids.flatten(), minlength=experts).tolist()
    rows = torch.randn(tokens * k, config.hidden_size)
    weights = torch.rand(tokens * k)
    model = DeepSeekV3.from_pretrained(hf_dir)
    moe = model.model.layers[layer].mlp.experts
    echo_ports = [free_port() for _ in shards]
    echoes = [subprocess.Popen([sys.executable, __file__, "--echo-server", str(p)]) for p in echo_ports]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in echo_ports]
    calls = [c.unary_unary(ECHO) for c in channels]
    for call in calls:  # the echo processes import torch first: wait until they answer
        await call(b"", timeout=120, wait_for_ready=True)
    streams = [c.stream_stream(ECHO_STREAM)() for c in channels]

    async def stream_echo(stream, payload: bytes) -> bytes:
        await stream.write(payload)
        return await stream.read()

    try:
        best_layer = best_echo = best_stream_echo = best_compute = float("inf")
        for _ in range(repeats * 20):
            start = time.perf_counter()
            await pool.compute(layer, rows, counts, weights)
            best_layer = min(best_layer, time.perf_counter() - start)
            # the same bytes as the two Compute requests (rows + weights), echoed by two processes at once
            half = rows.shape[0] // 2
            payloads = [
                rows[:half].numpy().tobytes() + weights[:half].numpy().tobytes(),
                rows[half:].numpy().tobytes() + weights[half:].numpy().tobytes(),
            ]
            start = time.perf_counter()
            await asyncio.gather(*(call(p, timeout=30) for call, p in zip(calls, payloads, strict=True)))
            best_echo = min(best_echo, time.perf_counter() - start)
            start = time.perf_counter()
            await asyncio.gather(*(stream_echo(st, p) for st, p in zip(streams, payloads, strict=True)))
            best_stream_echo = min(best_stream_echo, time.perf_counter() - start)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as on the shards (OMP_NUM_THREADS=1)
            start = time.perf_counter()  # the shards' work: all rows on one thread, halved (2 shards at once)
            with torch.no_grad():
                ops.grouped_swiglu(rows, torch.tensor(counts), moe.gate_up_proj, moe.down_proj, weights)
            compute = (time.perf_counter() - start) / 2
            torch.set_num_threads(threads)
            best_compute = min(best_compute, compute)
    finally:
        for st in streams:
            st.cancel()
        for c in channels:
            await c.close()
        for e in echoes:
            e.terminate()
        await pool.close()
    overhead = max(best_layer - best_compute, 1e-9)
    return {
        "rows": rows.shape[0],
        "bytes_per_layer": rows.numel() * 4 + weights.numel() * 4,
        "layer_ms": best_layer * 1e3,
        "compute_ms": best_compute * 1e3,
        "dispatch_overhead_ms": overhead * 1e3,
        "echo_ms": best_echo * 1e3,
        "stream_echo_ms": best_stream_echo * 1e3,
        "overhead_vs_echo": overhead / best_echo,
        "overhead_vs_stream_echo": overhead / best_stream_echo,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_serving.json"))
    parser.add_argument("--echo-server", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server(args.echo_server)
        return
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = ModelConfig.from_hf_config(ModelConfig.flavour("debug").to_hf_config() | BENCH_CONFIG)
    ours = DeepSeekV3(config).eval()
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    hf_dir = work / "hf"
    ours.save_pretrained(hf_dir)
    theirs = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    shard_ports = [free_port() for _ in range(2)]
    router_port = free_port()
    procs = [
        _spawn(
            [
                "-m",
                "dsv3.expert_shard",
                "--host",
                "127.0.0.1",
                "--port",
                str(p),
                "--device",
                "cpu",
                "--capacity",
                "1024",
            ],
            work / f"shard{p}.log",
        )
        for p in shard_ports
    ]
    shards = [f"127.0.0.1:{p}" for p in shard_ports]
    router = f"127.0.0.1:{router_port}"
    procs.append(
        _spawn(
            [
                "-m",
                "dsv3.router",
                "--host",
                "127.0.0.1",
                "--port",
                str(router_port),
                "--device",
                "cpu",
                "--model-dir",
                str(hf_dir),
                "--shards",
                ",".join(shards),
                "--max-batch",
                "64",
                "--max-length",
                str(PROMPT + args.new_tokens + 8),
            ],
            work / "router.log",
            args.threads,
        )
    )
    try:
        _wait_serving(router)
        probe = torch.randint(0, config.vocab_size, (1, 32))
        first = generate(ours, probe, 4)[0, 32:].tolist()
        if asyncio.run(_router_tokens(router, probe[0].tolist(), 4)) != first:
            raise SystemExit("router and in-process greedy tokens differ; refusing to time them")
        contenders = _contenders(ours, theirs, router)
        rows = []
        for batch in BATCHES:
            ids = torch.randint(0, config.vocab_size, (batch, PROMPT))
            for fn in contenders.values():  # warm-up
                fn(ids[:, :16], 2)
            best = {name: [float("inf"), float("inf")] for name in contenders}
            for _ in range(args.repeats):
                for name, fn in contenders.items():
                    prefill, decode = fn(ids, args.new_tokens)
                    best[name][0] = min(best[name][0], prefill)
                    best[name][1] = min(best[name][1], decode)
            for name, (one, decode) in best.items():
                rows.append(
                    {
                        "contender": name,
                        "batch": batch,
                        "prefill_tokens_per_s": batch * PROMPT / one,
                        "decode_tokens_per_s": batch * (args.new_tokens - 1) / decode,
                    }
                )
                print(
                    f"batch {batch:>3} | {name:>16} | "
                    f"prefill {rows[-1]['prefill_tokens_per_s']:>8.0f} tok/s | "
                    f"decode {rows[-1]['decode_tokens_per_s']:>7.0f} tok/s",
                    flush=True,
                )
        dispatch = asyncio.run(_dispatch_overhead(shards, hf_dir, config, args.repeats))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    _report(rows, dispatch, args, transformers.__version__)


async def _router_tokens(address: str, prompt: list[int], new: int) -> list[int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        request = router_pb2.GenerateRequest(prompt_ids=prompt, max_tokens=new)
        return [r.token async for r in stub.Generate(request, timeout=120)]


def _report(rows: list[dict], dispatch: dict, args, hf_version: str) -> None:
    by = {(r["contender"], r["batch"]): r for r in rows}
    print(f"\n{'batch':>5} | {'contender':>16} | {'prefill tok/s':>13} | {'decode tok/s':>12} | decode vs HF")
    for r in rows:
        hf = by[("transformers", r["batch"])]["decode_tokens_per_s"]
        print(
            f"{r['batch']:>5} | {r['contender']:>16} | {r['prefill_tokens_per_s']:>13.0f} | "
            f"{r['decode_tokens_per_s']:>12.0f} | {r['decode_tokens_per_s'] / hf:>10.2f}x"
        )
    print(
        f"\ndispatch per MoE layer ({dispatch['rows']} rows, {dispatch['bytes_per_layer']} bytes): layer "
        f"{dispatch['layer_ms']:.2f} ms, shard compute {dispatch['compute_ms']:.2f} ms, overhead "
        f"{dispatch['dispatch_overhead_ms']:.2f} ms; unary echo {dispatch['echo_ms']:.2f} ms -> "
        f"{dispatch['overhead_vs_echo']:.2f}x that floor (goal <= 1.5x); echo on an open stream "
        f"{dispatch['stream_echo_ms']:.2f} ms -> {dispatch['overhead_vs_stream_echo']:.2f}x"
    )
    r64 = by[("router+2 shards", 64)]["decode_tokens_per_s"]
    goals = {
        "router_beats_hf_at_16": by[("router+2 shards", 16)]["decode_tokens_per_s"]
        > by[("transformers", 16)]["decode_tokens_per_s"],
        "router_beats_hf_at_64": r64 > by[("transformers", 64)]["decode_tokens_per_s"],
        "router_at_80pct_of_dsv3_at_64": r64 >= 0.8 * by[("dsv3", 64)]["decode_tokens_per_s"],
        "dispatch_le_1_5x_echo": dispatch["overhead_vs_echo"] <= 1.5,
    }
    print("goals:", ", ".join(f"{k}={'met' if v else 'NOT met'}" for k, v in goals.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "torch": torch.__version__,
                "transformers": hf_version,
                "threads": args.threads,
                "config": BENCH_CONFIG,
                "prompt_tokens": PROMPT,
                "new_tokens": args.new_tokens,
                "rows": rows,
                "dispatch": dispatch,
                "goals": goals,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
