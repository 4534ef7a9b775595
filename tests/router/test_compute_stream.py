"""The router's `ComputeStream` client against a real grpc.aio server on loopback (a stand-in shard whose
stream answers, stalls or dies on request): answers matched in order, deadlines, a broken stream failing
its pending requests and the next request opening a new one."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from dsv3.router.compute_stream import ComputeStream
from dsv3.rpc.v1 import expert_pb2, expert_pb2_grpc
from dsv3.serving import tensor_codec
from dsv3.serving.ports import free_port


class _StandIn(expert_pb2_grpc.ExpertShardServiceServicer):
    """Answers each request with its layer number as the rows; layer 99 is never answered, layer 98
    refused with FAILED_PRECONDITION."""

    def __init__(self) -> None:
        self.opened = 0

    async def ComputeStream(self, request_iterator, context):
        self.opened += 1
        async for request in request_iterator:
            if request.layer == 99:
                await asyncio.sleep(3600)
            if request.layer == 98:
                error = expert_pb2.ComputeError(
                    code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="experts: not here"
                )
                yield expert_pb2.ComputeResponse(error=error)
                continue
            await asyncio.sleep(0.01 * (request.layer % 3))  # later requests may finish first: order holds
            yield expert_pb2.ComputeResponse(rows=tensor_codec.encode(torch.tensor([float(request.layer)])))


def _answered(reply: expert_pb2.ComputeResponse) -> int:
    return int(tensor_codec.decode(reply.rows).item())


async def _server(port: int, servicer: _StandIn) -> grpc.aio.Server:
    server = grpc.aio.server()
    expert_pb2_grpc.add_ExpertShardServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def test_answers_in_order_deadline_and_reopen_after_the_shard_dies() -> None:
    async def main() -> None:
        port = free_port()
        servicer = _StandIn()
        server = await _server(port, servicer)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stream = ComputeStream(expert_pb2_grpc.ExpertShardServiceStub(channel), f"127.0.0.1:{port}")
        try:
            # concurrent requests on one stream, each answer its own
            replies = await asyncio.gather(
                *(stream.compute(expert_pb2.ComputeRequest(layer=n), 5) for n in range(1, 7))
            )
            assert [_answered(r) for r in replies] == list(range(1, 7))
            assert servicer.opened == 1
            # a refusal raises with the shard's code; the stream stays open
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stream.compute(expert_pb2.ComputeRequest(layer=98), 5)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "not here" in err.value.details()
            assert _answered(await stream.compute(expert_pb2.ComputeRequest(layer=7), 5)) == 7
            assert servicer.opened == 1
            # an answer that never comes: DEADLINE_EXCEEDED, and the next request opens a new stream
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stream.compute(expert_pb2.ComputeRequest(layer=99), 0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert _answered(await stream.compute(expert_pb2.ComputeRequest(layer=8), 5)) == 8
            assert servicer.opened == 2
            # the shard dies with a request in flight: it fails (not hangs), well before its deadline
            pending = asyncio.ensure_future(stream.compute(expert_pb2.ComputeRequest(layer=99), 30))
            await asyncio.sleep(0.2)
            await server.stop(grace=None)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(pending, 10)
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            # ... and once a shard serves that address again, the next request opens a fresh stream
            servicer = _StandIn()
            server = await _server(port, servicer)
            reply = await stream.compute(expert_pb2.ComputeRequest(layer=9), 10)
            assert _answered(reply) == 9 and servicer.opened == 1
        finally:
            await stream.aclose()
            await channel.close()
            await server.stop(grace=None)

    asyncio.run(main())
