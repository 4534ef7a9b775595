"""The checkpoint service as a process: reflection, SIGTERM drain, configuration errors."""

import signal
import subprocess
import sys

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def test_reflection_lists_the_checkpoint_service(shared_server) -> None:
    with grpc.insecure_channel(shared_server.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "dsv3.rpc.v1.CheckpointService" in services and "grpc.health.v1.Health" in services


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
