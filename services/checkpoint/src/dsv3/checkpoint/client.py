"""Python client of the checkpoint service, used by trainers, expert shards and users.

Tensors stream in chunks straight from their own memory (no copy of the whole set), each chunk
carrying the running CRC-32 of its tensor. Large saves and loads are split over `streams` concurrent
gRPC streams, each on its own connection: one Python gRPC stream is CPU-bound well below what a disk
or a NIC carries. Transient UNAVAILABLE errors are retried with exponential
backoff (a retried save or load starts over; the server discards the interrupted attempt); any other
error is raised as the `grpc.RpcError` the server sent.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from dsv3.checkpoint import checksum, wire
from dsv3.checkpoint.prefetch import prefetched
from dsv3.checkpoint.split import balanced_runs, group
from dsv3.rpc.v1 import checkpoint_pb2, checkpoint_pb2_grpc, tensor_pb2
from dsv3.serving import telemetry

try:  # the server's install (dsv3-rpc + dsv3-checkpoint) has none of these; the client needs all three
    import numpy as np
    import torch

    from dsv3.serving import tensor_codec
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError(
        f"dsv3.checkpoint.CheckpointClient needs torch, numpy and the core dsv3 (dsv3.serving.tensor_codec),"
        f" but {exc.name!r} is not installed: pip install 'dsv3-checkpoint[client]'"
        " (from a checkout: pip install ./protos . './services/checkpoint[client]')",
        name=exc.name,
    ) from exc

T = TypeVar("T")
_SERVICE = "/dsv3.rpc.v1.CheckpointService/"


class _FastStub(checkpoint_pb2_grpc.CheckpointServiceStub):
    """The generated stub, with Save and Load on the copy-saving chunk codecs of `wire`."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self.Save = channel.stream_unary(
            _SERVICE + "Save",
            request_serializer=wire.serialize_save_request,
            response_deserializer=checkpoint_pb2.SaveResponse.FromString,
        )
        self.Load = channel.unary_stream(
            _SERVICE + "Load",
            request_serializer=checkpoint_pb2.LoadRequest.SerializeToString,
            response_deserializer=wire.deserialize_load_response,
        )


Stub = _FastStub


class CheckpointClient:
    def __init__(
        self,
        address: str,
        *,
        chunk_bytes: int = 1 << 20,
        retries: int = 5,
        backoff_seconds: float = 0.2,
        timeout_seconds: float = 30.0,
        stream_timeout_seconds: float = 3600.0,
        prefetch: int = 2,
        streams: int = 2,
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be > 0")
        if streams < 1:
            raise ValueError("streams must be >= 1")
        self.address = address
        self.chunk_bytes = chunk_bytes
        self.prefetch = prefetch
        self.streams = streams
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.timeout = timeout_seconds
        self.stream_timeout = stream_timeout_seconds
        limit = 2 * chunk_bytes + (1 << 20)
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.use_local_subchannel_pool", 1),  # a connection of its own per channel
        ]
        self._channels = [
            telemetry.traced_channel(grpc.insecure_channel(address, options=options)) for _ in range(streams)
        ]
        self._stubs = [_FastStub(c) for c in self._channels]
        self._stub = self._stubs[0]

    # ---- plumbing --------------------------------------------------------------------------------
    def _with_retries(self, call: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise
                time.sleep(self.backoff_seconds * 2**attempt)
        raise AssertionError("unreachable")

    def _on_all_streams(self, calls: list[Callable[[Stub], T]]) -> list[T]:
        """Run each call (with retries) on its own connection, concurrently; the first error is raised."""
        if len(calls) == 1:
            return [self._with_retries(lambda: calls[0](self._stub))]
        with ThreadPoolExecutor(len(calls), thread_name_prefix="checkpoint-stream") as pool:
            futures = [  # each in a copy of the caller's context: its trace continues on that thread
                pool.submit(contextvars.copy_context().run, self._with_retries, lambda c=call, s=stub: c(s))
                for call, stub in zip(calls, self._stubs, strict=False)
            ]
            return [f.result() for f in futures]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> CheckpointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- save / commit ---------------------------------------------------------------------------
    def _chunks(self, tensors: list[torch.Tensor]) -> Iterator[bytes]:
        """Serialized chunk requests, each framed straight from the tensor's memory (one copy)."""
        for index, tensor in enumerate(tensors):
            view, crc = tensor_codec.byte_view(tensor), 0
            for offset in range(0, len(view), self.chunk_bytes):
                data = view[offset : offset + self.chunk_bytes]
                crc = checksum.crc32(data, crc)
                yield wire.encode_save_chunk(index, offset, data, crc)

    def _save_requests(
        self, header: checkpoint_pb2.SaveHeader, tensors: list[torch.Tensor]
    ) -> Iterator[checkpoint_pb2.SaveRequest | bytes]:
        yield checkpoint_pb2.SaveRequest(header=header)
        # gRPC sends one message at a time and waits for it to leave; copying and checksumming the next
        # chunks in a thread overlaps that work with the transfer (at most `prefetch` chunks in memory).
        yield from prefetched(self._chunks(tensors), self.prefetch)

    def save(
        self,
        job: str,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        part: int = 0,
        metadata: Mapping[str, object] | None = None,
        attempt: int | None = None,
    ) -> int:
        """Store one part of (job, step); returns the bytes written. Invisible until `commit`.

        `attempt` orders concurrent or repeated saves of one part: the server refuses (ABORTED) a save
        once a newer attempt of the part exists. Pass the job's restart count for a strict order
        across hosts; the default, the wall clock in nanoseconds, makes the newest save win.
        """
        names = list(tensors)
        attempt = time.time_ns() if attempt is None else attempt
        sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
        segments = group(names, balanced_runs(sizes, min(self.streams, len(names)) or 1)) or [[]]
        text_metadata = {k: str(v) for k, v in (metadata or {}).items()}

        def save_segment(index: int, segment: list[str]):
            values = [tensors[n] for n in segment]
            header = checkpoint_pb2.SaveHeader(
                job=job,
                step=step,
                part=part,
                tensors=[
                    tensor_pb2.TensorSpec(name=n, dtype=tensor_codec.wire_dtype(t.dtype), shape=list(t.shape))
                    for n, t in zip(segment, values, strict=True)
                ],
                metadata=text_metadata,
                segment=index,
                num_segments=len(segments) if len(segments) > 1 else 0,
                attempt=attempt,
            )
            return lambda stub: stub.Save(self._save_requests(header, values), timeout=self.stream_timeout)

        calls = [save_segment(i, segment) for i, segment in enumerate(segments)]
        return sum(r.bytes_written for r in self._on_all_streams(calls))

    def commit(
        self, job: str, step: int, num_parts: int = 1, metadata: Mapping[str, object] | None = None
    ) -> checkpoint_pb2.CheckpointInfo:
        request = checkpoint_pb2.CommitRequest(
            job=job, step=step, num_parts=num_parts, metadata={k: str(v) for k, v in (metadata or {}).items()}
        )
        return self._with_retries(lambda: self._stub.Commit(request, timeout=self.timeout)).checkpoint

    # ---- queries ---------------------------------------------------------------------------------
    def checkpoints(self, job: str) -> list[checkpoint_pb2.CheckpointInfo]:
        request = checkpoint_pb2.ListRequest(job=job)
        return list(self._with_retries(lambda: self._stub.List(request, timeout=self.timeout)).checkpoints)

    def list(self, job: str) -> list[int]:
        return [c.step for c in self.checkpoints(job)]

    def latest(self, job: str) -> int | None:
        request = checkpoint_pb2.LatestRequest(job=job)
        response = self._with_retries(lambda: self._stub.Latest(request, timeout=self.timeout))
        return response.checkpoint.step if response.found else None

    def delete(self, job: str, step: int) -> None:
        request = checkpoint_pb2.DeleteRequest(job=job, step=step)
        self._with_retries(lambda: self._stub.Delete(request, timeout=self.timeout))

    # ---- load ------------------------------------------------------------------------------------
    def load(
        self, job: str, step: int | None = None, names: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Tensors of a committed checkpoint (step None: the latest), all of them or only `names`."""
        if step is None:
            step = self.latest(job)  # resolved once, so that every stream reads the same checkpoint
        shards = 1 if step is None or (names is not None and len(names) <= 1) else self.streams
        requests = [
            checkpoint_pb2.LoadRequest(
                job=job, step=step or 0, latest=step is None, names=names or [], shard=i, num_shards=shards
            )
            for i in range(shards)
        ]  # step still None: nothing committed yet; the server answers NOT_FOUND (or the newest)
        out: dict[str, torch.Tensor] = {}
        for loaded in self._on_all_streams([lambda stub, r=r: self._load_once(stub, r) for r in requests]):
            _refuse_twice(out, loaded)
            out.update(loaded)
        return out

    def _load_once(self, stub: Stub, request: checkpoint_pb2.LoadRequest) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        spec, buffer, filled = None, None, 0

        def finish() -> None:
            if spec is None:
                return
            if filled != len(buffer):
                raise ValueError(f"{spec.name}: received {filled} of {len(buffer)} bytes")
            _refuse_twice(out, {spec.name: None})
            out[spec.name] = buffer.view(tensor_codec.torch_dtype(spec.dtype)).reshape(tuple(spec.shape))

        for message in stub.Load(request, timeout=self.stream_timeout):
            if isinstance(message, checkpoint_pb2.LoadResponse) and message.WhichOneof("kind") == "tensor":
                finish()
                spec = message.tensor
                buffer = torch.empty(tensor_codec.nbytes(spec.dtype, list(spec.shape)), dtype=torch.uint8)
                filled = 0
                continue
            data = message if isinstance(message, memoryview) else memoryview(message.data)
            if spec is None or filled + len(data) > len(buffer):
                raise ValueError("Load stream sent more bytes than its tensor spec announced")
            buffer.numpy()[filled : filled + len(data)] = np.frombuffer(data, dtype=np.uint8)
            filled += len(data)
        finish()
        return out


def _refuse_twice(have: Mapping[str, object], new: Mapping[str, object]) -> None:
    """A checkpoint committed before commit refused duplicate names may hold one twice: never pick one."""
    twice = have.keys() & new.keys()
    if twice:
        raise ValueError(f"the checkpoint holds tensor(s) {sorted(twice)[:5]} more than once")
