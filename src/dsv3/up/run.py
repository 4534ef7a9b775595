"""`dsv3 up`: the whole platform on one machine, as real processes talking gRPC, in phases.

1. checkpoint service (embedded index, or Redis with `--redis-url`), data under `<output-dir>/checkpoints`;
2. the trainer under torchrun (2 processes, expert parallel 2, MTP on), checkpointing into it; a second
   run resumes the same job (and is done at once when the first one finished);
3. expert shards and the router, loaded from the last committed checkpoint with redundant replicas;
4. prompts completed through the router's OpenAI-compatible HTTP API, with MTP speculative decoding;
5. a rebalance of the experts from the load the router observed, applied while serving, and the same
   prompts again: the shards' load before and after;
6. a summary (and `report.png`) of what happened and how to use what is still running (`--serve`).

The services are started by name (`children.py`): any that dies stops the run with a message naming it.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dsv3.up import console
from dsv3.up.children import Children
from dsv3.up.probes import Completion, ServiceProbe, complete_http, rebalance, shard_loads

JOB = "up"
MODEL_NAME = "dsv3-up"
REDUNDANT_EXPERTS = 4  # spare slots per MoE layer the planner gives to the busiest experts
PROMPTS = [
    "def ",
    "import os\n",
    "class Tree:\n    def __init__(self",
    "for i in range(",
    "# Copyright",
    "return ",
]


@dataclasses.dataclass(frozen=True)
class UpSettings:
    steps: int = 300
    model: str = "debug"
    shards: int = 3  # every expert on 2 of them, plus spare slots for the hot ones: a rebalance can help
    port_base: int = 50100
    output_dir: Path = Path("runs/up")
    serve: bool = False
    redis_url: str = ""
    prompt: str = "def "
    max_tokens: int = 64
    batch: int = 16
    seq_len: int = 128
    checkpoint_interval: int = 50
    threads: int = 1  # torch threads per process (2 trainer workers share a 2-core box)

    def __post_init__(self) -> None:
        for name in ("steps", "shards", "max_tokens", "batch", "seq_len", "checkpoint_interval", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        highest = 65535 - 10 - self.shards  # the shards' ports sit at port_base + 10 + i
        if not 1024 <= self.port_base <= highest:
            raise ValueError(f"--port-base must be in [1024, {highest}], got {self.port_base}")

    @property
    def ports(self) -> dict[str, int]:
        ports = {
            "checkpoint": self.port_base,
            "trainer-status": self.port_base + 1,
            "router": self.port_base + 2,
            "router-http": self.port_base + 3,
        }
        ports.update({f"expert-shard-{i}": self.port_base + 10 + i for i in range(self.shards)})
        return ports


def _check_ports_free(settings: UpSettings) -> None:
    for name, port in settings.ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is fine
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                raise ValueError(
                    f"--port-base {settings.port_base}: port {port} (for {name}) is in use; "
                    "is another `dsv3 up` running? pick another --port-base"
                ) from None


def _python(module: str, *args: object) -> list[str]:
    return [sys.executable, "-m", module, *(str(a) for a in args)]


def _train(settings: UpSettings, children: Children, checkpoint: str) -> Path:
    out = settings.output_dir / "train"
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--max-restarts=1", "-m", "dsv3.trainer", "--model", settings.model, "--steps", settings.steps,
        "--batch", settings.batch, "--seq-len", settings.seq_len, "--ep", 2, "--checkpoint", checkpoint,
        "--job", JOB, "--checkpoint-interval", settings.checkpoint_interval, "--output-dir", out,
        "--status-port", settings.ports["trainer-status"], "--status-host", "127.0.0.1", "--progress", "log",
        "--export", out / "hf",
    ]  # fmt: skip
    children.start("trainer", [str(a) for a in argv], may_exit=True, env={"OMP_NUM_THREADS": "1"})
    with console.TrainingProgress(out / "metrics.jsonl", settings.steps) as progress:
        children.wait_exit("trainer", on_tick=progress.refresh)
    return out


def _serve(settings: UpSettings, children: Children, checkpoint: str) -> dict[str, str]:
    addresses = {}
    for i in range(settings.shards):
        name = f"expert-shard-{i}"
        port = settings.ports[name]
        argv = _python("dsv3.expert_shard", "--host", "127.0.0.1", "--port", port, "--device", "cpu",
                       "--shard-id", name, "--checkpoint", checkpoint)  # fmt: skip
        children.start(name, argv)
        addresses[name] = f"127.0.0.1:{port}"
    router = f"127.0.0.1:{settings.ports['router']}"
    children.start("router", _python(
        "dsv3.router", "--host", "127.0.0.1", "--port", settings.ports["router"], "--checkpoint", checkpoint,
        "--job", JOB, "--model-config", settings.model, "--shards", ",".join(addresses.values()),
        "--replicas", min(2, settings.shards), "--device", "cpu",
        "--http-port", settings.ports["router-http"], "--served-model-name", MODEL_NAME,
        "--redundant-experts", REDUNDANT_EXPERTS,
    ))  # fmt: skip
    for name, address in {**addresses, "router": router}.items():
        ServiceProbe(address).wait_serving(children, name, timeout=180)
    return {**addresses, "router": router}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _traffic(http: str, settings: UpSettings) -> Completion:
    """The prompts, concurrently (they share the router's continuous batch); the user's prompt's result."""
    prompts = [settings.prompt, *PROMPTS]
    with ThreadPoolExecutor(len(prompts)) as pool:
        done = list(pool.map(lambda p: complete_http(http, MODEL_NAME, p, settings.max_tokens), prompts))
    return done[0]


def run_up(settings: UpSettings) -> int:
    """Run every phase; 0 on success. Raises `ChildExited` (named) when a service dies; SIGTERM or
    Ctrl-C raise KeyboardInterrupt. Either way every child is stopped before this returns."""
    signal.signal(signal.SIGTERM, _interrupt)
    _check_ports_free(settings)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    (settings.output_dir / "run.json").write_text(json.dumps({"run_id": run_id, **settings.ports}))
    started = time.monotonic()
    with Children(settings.output_dir / "logs", run_id, settings.threads) as children:
        console.phase("checkpoint service")
        checkpoint = f"127.0.0.1:{settings.ports['checkpoint']}"
        store = ["--redis-url", settings.redis_url] if settings.redis_url else []
        children.start("checkpoint", _python(
            "dsv3.checkpoint", "--host", "127.0.0.1", "--port", settings.ports["checkpoint"],
            "--data-dir", settings.output_dir / "checkpoints", *store,
        ))  # fmt: skip
        ServiceProbe(checkpoint).wait_serving(children, "checkpoint", timeout=60)

        console.phase(f"training {settings.model} for {settings.steps} steps (torchrun, 2 processes, EP 2)")
        train_dir = _train(settings, children, checkpoint)

        console.phase(f"serving: router + {settings.shards} expert shards from the last checkpoint")
        addresses = _serve(settings, children, checkpoint)

        console.phase("generating through the OpenAI-compatible API (MTP speculative decoding)")
        http = f"http://127.0.0.1:{settings.ports['router-http']}"
        shards = {n: a for n, a in addresses.items() if n.startswith("expert-shard")}
        shard_loads(shards)  # reset the shards' counters: what follows is this run's traffic
        completion, before = _traffic(http, settings), shard_loads(shards)

        console.phase("rebalancing the experts from the observed load, while serving")
        change = rebalance(addresses["router"])
        _traffic(http, settings)
        after = shard_loads(shards)

        summary = console.Summary(
            settings=settings,
            train_dir=train_dir,
            addresses={**addresses, "http": http},
            completion=completion,
            before=before,
            after=after,
            change=change,
            elapsed=time.monotonic() - started,
        )
        summary.write_report(settings.output_dir / "report.png")
        summary.print()
        if settings.serve:
            console.phase("serving until Ctrl-C")
            while True:
                children.check()
                time.sleep(0.5)
    return 0
