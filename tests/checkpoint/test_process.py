"""The checkpoint service as a process: reflection, SIGTERM drain, configuration errors."""

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def test_reflection_lists_the_checkpoint_service(shared_server) -> None:
    with grpc.insecure_channel(shared_server.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "dsv3.rpc.v1.CheckpointService" in services and "grpc.health.v1.Health" in services


def test_server_moves_bytes_without_loading_torch(shared_server, shared_client) -> None:
    """The server only moves bytes: after a save, commit and load it has not mapped libtorch."""
    tensors = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(2, dtype=torch.bfloat16),
    }
    shared_client.save("no-torch", 1, tensors)
    shared_client.commit("no-torch", 1)
    loaded = shared_client.load("no-torch", 1)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    maps = Path(f"/proc/{shared_server.process.pid}/maps").read_text()
    assert "libtorch" not in maps and "libc10" not in maps


def test_sigterm_drains_and_exits_cleanly(make_server) -> None:
    srv = make_server()
    srv.process.send_signal(signal.SIGTERM)
    assert srv.process.wait(timeout=20) == 0
    assert "draining" in srv.log.read_text()


def test_checkpoint_cli_rejects_bad_config(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dsv3.checkpoint", "--data-dir", str(tmp_path), "--keep-last", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "keep_last must be >= 0" in result.stderr
