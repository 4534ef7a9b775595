"""The router's end of one shard's `ComputeStream`: requests in, answers matched to them in order.

The stream opens on first use and stays open; a shard's answers come in the order of its requests, so
each written request gets a future and the reader resolves the oldest. Every failure becomes a
`grpc.aio.AioRpcError`, the same kind a unary `Compute` raises, so the pool's handling (mark the shard
down, re-send its rows to other replicas) needs no second path:
- an answer with `error` set: that request's status (the stream stays open);
- a late answer (past the deadline): DEADLINE_EXCEEDED, and the stream is dropped, since what it
  would answer next no longer lines up with anything;
- the stream ending or breaking (the shard died, drained, restarted): every pending request fails
  with the stream's status, and the next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

import grpc

from dsv3.rpc.v1 import expert_pb2, expert_pb2_grpc


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class ComputeStream:
    def __init__(self, stub: expert_pb2_grpc.ExpertShardServiceStub, address: str) -> None:
        self.stub = stub
        self.address = address
        self._call = None
        self._reader: asyncio.Task | None = None
        self._pending: collections.deque[asyncio.Future] = collections.deque()
        self._writing = asyncio.Lock()  # grpc.aio takes one write at a time per call

    async def compute(self, request: expert_pb2.ComputeRequest, timeout: float) -> expert_pb2.ComputeResponse:
        answer = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):  # one deadline for the write and the answer (no tasks)
                async with self._writing:  # requests enter the stream in the order of their answers
                    if self._call is None:
                        self._open()
                    self._pending.append(answer)
                    await self._call.write(request)
                reply = await answer
        except TimeoutError:
            answer.cancel()
            self.close(f"no answer from {self.address} within {timeout}s")
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"shard {self.address}: deadline") from None
        except grpc.RpcError:  # the write failed: the stream is broken
            answer.cancel()
            self.close(f"stream to {self.address} broke")
            raise
        if reply.HasField("error"):
            code = _STATUS_BY_NUMBER.get(reply.error.code, grpc.StatusCode.UNKNOWN)
            raise rpc_error(code, reply.error.message)
        return reply

    def _open(self) -> None:
        self._call = self.stub.ComputeStream()
        self._reader = asyncio.get_running_loop().create_task(self._read(self._call))

    async def _read(self, call) -> None:
        error: grpc.aio.AioRpcError
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    error = rpc_error(grpc.StatusCode.UNAVAILABLE, f"shard {self.address} closed the stream")
                    break
                if not self._pending:
                    error = rpc_error(grpc.StatusCode.INTERNAL, f"shard {self.address}: unasked answer")
                    break
                answer = self._pending.popleft()
                if not answer.done():
                    answer.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            error = rpc_error(grpc.StatusCode.CANCELLED, f"stream to {self.address} closed")
        if self._call is call:
            self._fail_pending(error)
            self._call = None
            call.cancel()

    def _fail_pending(self, error: BaseException) -> None:
        while self._pending:
            answer = self._pending.popleft()
            if not answer.done():
                answer.set_exception(error)

    def close(self, why: str = "closed") -> None:
        """Drop the stream (a down shard, a late answer, shutdown); pending requests fail with UNAVAILABLE."""
        call, self._call = self._call, None
        self._fail_pending(rpc_error(grpc.StatusCode.UNAVAILABLE, why))
        if call is not None:
            call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None

    async def aclose(self) -> None:
        reader = self._reader
        self.close()
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
