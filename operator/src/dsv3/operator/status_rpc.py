"""One status call to a dsv3 service, as the operator makes them: stubs imported lazily (an older
dsv3-rpc without that contract gives None), a deadline, and None for any failure, so a job's status
keeps what the pods say when the service does not answer."""

from __future__ import annotations

import importlib
from typing import Any


def call_status(contract: str, service: str, method: str, request: str, address: str, timeout: float) -> Any:
    """`<service>Stub(channel).<method>(<request>())` of `dsv3.rpc.v1.<contract>_pb2` at `address`."""
    try:
        pb2 = importlib.import_module(f"dsv3.rpc.v1.{contract}_pb2")
        pb2_grpc = importlib.import_module(f"dsv3.rpc.v1.{contract}_pb2_grpc")
    except ImportError:
        return None
    import grpc

    try:
        with grpc.insecure_channel(address) as channel:
            stub = getattr(pb2_grpc, f"{service}Stub")(channel)
            return getattr(stub, method)(getattr(pb2, request)(), timeout=timeout)
    except grpc.RpcError:
        return None
