"""What `dsv3 up` asks the running services: health, a completion, the expert load they saw.

Only the `dsv3-rpc` stubs are used (the core's own dependency), never a service's internals.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsv3.rpc.v1 import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
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
    accepted_drafts: int = 0  # MTP draft tokens the main model accepted (speculative decoding)
    rejected_drafts: int = 0

    @property
    def acceptance(self) -> float | None:
        drafted = self.accepted_drafts + self.rejected_drafts
        return self.accepted_drafts / drafted if drafted else None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def complete_http(http: str, model: str, prompt: str, max_tokens: int, seed: int = 0) -> Completion:
    """One `POST /v1/completions` to the router's OpenAI-compatible API (what a user's client sends)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed}
    request = urllib.request.Request(
        f"{http}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.load(response)
    seconds = time.perf_counter() - start
    usage = answer["usage"]
    details = usage.get("completion_tokens_details") or {}
    return Completion(
        prompt,
        answer["choices"][0]["text"],
        usage["completion_tokens"],
        seconds,
        int(details.get("accepted_prediction_tokens") or 0),
        int(details.get("rejected_prediction_tokens") or 0),
    )


def shard_loads(shards: dict[str, str]) -> dict[str, dict[tuple[int, int], int]]:
    """Per shard name: rows each (layer, expert) slot computed since the previous Status call."""
    loads: dict[str, dict[tuple[int, int], int]] = {}
    for name, address in shards.items():
        with grpc.insecure_channel(address) as channel:
            status = expert_pb2_grpc.ExpertShardServiceStub(channel).Status(
                expert_pb2.ShardStatusRequest(), timeout=10
            )
        loads[name] = {(slot.slot.layer, slot.slot.expert): slot.tokens for slot in status.slots}
    return loads


def rebalance(router: str) -> router_pb2.PlacementChange:
    """Ask the router to re-plan from the load it observed and apply it while serving."""
    with grpc.insecure_channel(router) as channel:
        return (
            router_pb2_grpc.RouterServiceStub(channel)
            .Rebalance(router_pb2.RebalanceRequest(), timeout=300)
            .change
        )
