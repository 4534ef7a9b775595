"""Checkpoint service throughput vs torch.save/torch.load, and the server's memory during transfers.

A real `dsv3-checkpoint` process (embedded index) stores its data next to where torch.save writes, on
the same disk. The service fsyncs every part before reporting success, so torch.save is followed by
an fsync too (the same durability). Two torch baselines for saving: a new file per step, as a training
loop keeps several checkpoints (the service's case), and one file rewritten in place (its page-cache
pages are recycled, the most favourable case for torch). Loads are timed cold, as after a restart:
torch's file is evicted from the page cache first (the service writes around the cache, O_DIRECT).

Then the same bytes are saved as `--concurrent` parts (default 50) by as many clients at once, one
stream each, as every rank of a job checkpointing together: the server's peak RSS above idle during
that burst, and what it holds once the streams have closed, are reported.

    python benchmarks/bench_checkpoint.py [--gib 1.0] [--concurrent 50] [--dir DIR] [--out ...json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dsv3.checkpoint import CheckpointClient
from dsv3.serving.ports import free_port


class PeakRss:
    """Samples a process's resident memory every few milliseconds while active."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _make_tensors(gib: float) -> dict[str, torch.Tensor]:
    """Model-like mix: bf16 matrices of a few sizes, fp32 optimizer-state-like tensors, small ones."""
    target, tensors, i = int(gib * (1 << 30)), {}, 0
    total = 0
    while total < target:
        shape = [(4096, 4096), (2048, 7168), (7168, 512), (129, 1024)][i % 4]
        dtype = torch.bfloat16 if i % 3 else torch.float32
        t = torch.randn(shape, dtype=torch.float32).to(dtype)
        tensors[f"model.layers.{i // 4}.t{i % 4}"] = t
        total += t.numel() * t.element_size()
        i += 1
    return tensors


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _torch_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(tensors, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _evict(path: Path) -> None:
    """Drop a file's pages from the page cache so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _concurrent_saves(address: str, pid: int, tensors: dict[str, torch.Tensor], streams: int) -> dict:
    """`streams` clients each save one part of `tensors` at the same moment; memory and time of the burst."""
    pieces = {}  # flat halves of every tensor (views): enough pieces for every stream to have some
    for name, tensor in tensors.items():
        for k, piece in enumerate(tensor.reshape(-1).chunk(-(-2 * streams // len(tensors)))):
            pieces[f"{name}.{k}"] = piece
    names = list(pieces)
    parts = [{n: pieces[n] for n in names[i::streams]} for i in range(streams)]
    parts = [p for p in parts if p]
    clients = [CheckpointClient(address, streams=1) for _ in parts]
    idle = psutil.Process(pid).memory_info().rss
    try:
        with PeakRss(pid) as mem, ThreadPoolExecutor(len(parts)) as pool:
            start = time.perf_counter()
            list(pool.map(lambda i: clients[i].save("burst", 0, parts[i], part=i), range(len(parts))))
            clients[0].commit("burst", 0, num_parts=len(parts))
            seconds = time.perf_counter() - start
        time.sleep(0.5)  # the last stream's buffers are handed back after it closes
        after = psutil.Process(pid).memory_info().rss
        clients[0].delete("burst", 0)
    finally:
        for client in clients:
            client.close()
    return {
        "streams": len(parts),
        "seconds": seconds,
        "idle_rss": idle,
        "peak_rss": mem.peak,
        "after_rss": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--streams", type=int, default=2, help="concurrent gRPC streams of the client")
    parser.add_argument("--repeats", type=int, default=3, help="attempts; the best of each is kept")
    parser.add_argument("--concurrent", type=int, default=50, help="clients saving one part each at once")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_checkpoint.json"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-ckpt-"))
    tensors = _make_tensors(args.gib)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsv3.checkpoint",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(scratch / "service"),
            "--log-level",
            "WARNING",
        ]
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(600):
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    time.sleep(0.05)
        rows = []
        with CheckpointClient(f"127.0.0.1:{port}", streams=args.streams) as client:
            idle = psutil.Process(server.pid).memory_info().rss
            rewritten = scratch / "torch-rewritten.pt"
            for attempt in range(args.repeats):
                fresh = scratch / f"torch-{attempt}.pt"
                t_torch_save = _timed(lambda p=fresh: _torch_save(tensors, p))
                t_torch_rewrite = _timed(lambda: _torch_save(tensors, rewritten))
                with PeakRss(server.pid) as save_mem:
                    t_save = _timed(
                        lambda a=attempt: (client.save("bench", a, tensors), client.commit("bench", a))
                    )
                _evict(fresh)
                t_torch_load = _timed(lambda p=fresh: torch.load(p))
                loaded = {}
                with PeakRss(server.pid) as load_mem:
                    t_load = _timed(lambda a=attempt, out=loaded: out.update(client.load("bench", a)))
                assert all(torch.equal(loaded[k], tensors[k]) for k in tensors), "round trip mismatch"
                rows.append(
                    {
                        "attempt": attempt,
                        "bytes": nbytes,
                        "torch_save_new_file_s": t_torch_save,
                        "torch_save_rewrite_s": t_torch_rewrite,
                        "service_save_s": t_save,
                        "torch_load_cold_s": t_torch_load,
                        "service_load_s": t_load,
                        "server_idle_rss": idle,
                        "server_peak_rss_save": save_mem.peak,
                        "server_peak_rss_load": load_mem.peak,
                    }
                )
                loaded.clear()
        burst = _concurrent_saves(f"127.0.0.1:{port}", server.pid, tensors, args.concurrent)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)

    best = {k: min(r[k] for r in rows) for k in rows[0] if k.endswith("_s")}
    gb = nbytes / 1e9
    mib = 1 << 20
    print(
        f"{gb:.2f} GB of tensors, {len(tensors)} tensors, {args.streams} streams, best of {len(rows)}; "
        f"scratch on {scratch.parent}"
    )
    print(f"{'operation':<34} | {'seconds':>7} | {'GB/s':>6} | {'vs torch':>8}")
    table = [
        ("torch.save+fsync, new file per step", best["torch_save_new_file_s"], None),
        ("torch.save+fsync, one file rewritten", best["torch_save_rewrite_s"], None),
        ("service save+commit (fsynced)", best["service_save_s"], best["torch_save_new_file_s"]),
        ("  (vs torch rewriting one file)", best["service_save_s"], best["torch_save_rewrite_s"]),
        ("torch.load, cold", best["torch_load_cold_s"], None),
        ("service load, cold", best["service_load_s"], best["torch_load_cold_s"]),
    ]
    for name, seconds, baseline in table:
        ratio = f"{baseline / seconds:.2f}x" if baseline else ""
        print(f"{name:<38} | {seconds:>7.2f} | {gb / seconds:>6.2f} | {ratio:>8}")
    peak_save = max(r["server_peak_rss_save"] for r in rows) - rows[0]["server_idle_rss"]
    peak_load = max(r["server_peak_rss_load"] for r in rows) - rows[0]["server_idle_rss"]
    print(
        f"server RSS: idle {rows[0]['server_idle_rss'] / mib:.0f} MiB; peak above idle during save "
        f"{peak_save / mib:.0f} MiB, during load {peak_load / mib:.0f} MiB"
    )
    idle0 = rows[0]["server_idle_rss"]
    burst_peak, burst_after = burst["peak_rss"] - idle0, burst["after_rss"] - idle0
    print(
        f"{burst['streams']} concurrent save streams: {gb / burst['seconds']:.2f} GB/s; server RSS peak "
        f"above idle {burst_peak / mib:.0f} MiB, {burst_after / mib:.0f} MiB once they closed"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "rows": rows,
                "best": best,
                "streams": args.streams,
                "peak_above_idle_save": peak_save,
                "peak_above_idle_load": peak_load,
                "concurrent": burst,
                "peak_above_idle_concurrent": burst_peak,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
