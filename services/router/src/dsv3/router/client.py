"""Python client of the router: `forward`, `generate`, `stream`, `placement`, `rebalance`, with deadlines.

Imports grpc, torch (for `forward`'s logits), the stubs and the tensor codec only: none of the router
server's modules. Forward and Placement are retried on UNAVAILABLE through gRPC's service config (they
have no side effects); Generate is not (a retried stream would repeat tokens).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import torch

from dsv3.rpc.v1 import router_pb2, router_pb2_grpc
from dsv3.serving import tensor_codec

_RETRY = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "dsv3.rpc.v1.RouterService", "method": "Forward"},
                    {"service": "dsv3.rpc.v1.RouterService", "method": "Placement"},
                ],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class RouterClient:
    def __init__(
        self, address: str, timeout_seconds: float = 60.0, max_message_bytes: int = 256 << 20
    ) -> None:
        self.address = address
        self.timeout = timeout_seconds
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.service_config", _RETRY),
                ("grpc.enable_retries", 1),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forward(self, ids: torch.Tensor | list[list[int]], timeout: float | None = None) -> torch.Tensor:
        """Logits [batch, tokens, vocab] (float32) of token ids [batch, tokens]."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        reply = self.stub.Forward(
            router_pb2.ForwardRequest(input_ids=tensor_codec.encode(ids)), timeout=timeout or self.timeout
        )
        return tensor_codec.decode(reply.logits)

    def replies(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[int] | None = None,
        seed: int | None = None,
        timeout: float | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[router_pb2.GenerateResponse]:
        """Generate's messages as they come (the final one says how it ended and counts the drafts)."""
        request = router_pb2.GenerateRequest(
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=stop or [],
            seed=seed,
            ignore_eos=ignore_eos,
        )
        yield from self.stub.Generate(request, timeout=timeout or self.timeout)

    def stream(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[int] | None = None,
        seed: int | None = None,
        timeout: float | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[int]:
        """The new tokens as the router samples them (the deadline covers the whole stream)."""
        for reply in self.replies(
            prompt_ids, max_tokens, temperature, top_p, top_k, stop, seed, timeout, ignore_eos
        ):
            yield reply.token

    def generate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[int] | None = None,
        seed: int | None = None,
        timeout: float | None = None,
        ignore_eos: bool = False,
    ) -> list[int]:
        """The new tokens (up to max_tokens, ending at a stop token or EOS if one is sampled)."""
        return list(
            self.stream(prompt_ids, max_tokens, temperature, top_p, top_k, stop, seed, timeout, ignore_eos)
        )

    def placement(self, timeout: float | None = None) -> router_pb2.PlacementResponse:
        return self.stub.Placement(router_pb2.PlacementRequest(), timeout=timeout or self.timeout)

    def rebalance(
        self, tolerance: float | None = None, timeout: float | None = None
    ) -> router_pb2.RebalanceResponse:
        """Re-plan from the observed load now; returns once the change is applied (not retried)."""
        request = router_pb2.RebalanceRequest(tolerance=tolerance)
        return self.stub.Rebalance(request, timeout=timeout or self.timeout)
