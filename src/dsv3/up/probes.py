"""What `dsv3 up` asks the running services: health, a completion, the expert load they saw.

Only the `dsv3-rpc` stubs are used (the core's own dependency), never a service's internals.
"""

from __future__ import annotations

import dataclasses
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsv3.rpc.v1 import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from dsv3.tokenizer import ByteTokenizer
from dsv3.up.children import Children


class ServiceProbe:
    def __init__(self, address: str) -> None:
        self.address = address

    def serving(self) -> bool:
        try:
            with grpc.insecure_channel(self.address) as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def wait_serving(self, children: Children, name: str, timeout: float) -> None:
        """Until health says SERVING; a child that dies meanwhile raises `ChildExited` at once."""
        deadline = time.monotonic() + timeout
        while not self.serving():
            children.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} at {self.address} not serving after {timeout:.0f} s")
            time.sleep(0.2)


@dataclasses.dataclass(frozen=True)
class Completion:
    prompt: str
    text: str
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def generate_text(router: str, prompt: str, max_tokens: int, seed: int = 0) -> Completion:
    """Sample `max_tokens` byte tokens after `prompt` through the router's streaming `Generate`."""
    tokenizer = ByteTokenizer()
    request = router_pb2.GenerateRequest(
        prompt_ids=tokenizer.encode(prompt), max_tokens=max_tokens, temperature=0.8, top_k=20, seed=seed
    )
    with grpc.insecure_channel(router) as channel:
        start = time.perf_counter()
        tokens = [r.token for r in router_pb2_grpc.RouterServiceStub(channel).Generate(request, timeout=300)]
        seconds = time.perf_counter() - start
    return Completion(prompt, tokenizer.decode(tokens), len(tokens), seconds)


def expert_loads(shards: list[str]) -> dict[tuple[int, int], int]:
    """Rows each (layer, expert) computed on all shards since their previous Status call."""
    loads: dict[tuple[int, int], int] = {}
    for address in shards:
        with grpc.insecure_channel(address) as channel:
            status = expert_pb2_grpc.ExpertShardServiceStub(channel).Status(
                expert_pb2.ShardStatusRequest(), timeout=10
            )
        for slot in status.slots:
            key = (slot.slot.layer, slot.slot.expert)
            loads[key] = loads.get(key, 0) + slot.tokens
    return loads
