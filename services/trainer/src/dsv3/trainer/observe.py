"""The trainer's OpenTelemetry: a span per step and per checkpoint save, metrics per step.

Spans (exported when `OTEL_*` / `DSV3_TRACE_FILE` ask for traces): `train.step` on every rank with the
step, rank and loss; `train.checkpoint` around each save, parent of the checkpoint client's gRPC calls
(which the checkpoint server continues). Metrics (rank 0; scraped from `--metrics-port`, pushed with
`OTEL_METRICS_EXPORTER=otlp`): loss, tokens/s, per-layer MaxVio, step time, tokens, anomalies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from dsv3.serving import telemetry


class TrainerTelemetry:
    def __init__(self, rank: int, job: str, metrics_port: int = 0) -> None:
        """After `telemetry.setup` (the trainer's `train` does it before any client exists)."""
        self.rank, self.job = rank, job
        self.tracer = telemetry.tracer("dsv3.trainer")
        self.port = telemetry.serve_metrics(metrics_port) if rank == 0 else 0
        meter = telemetry.meter("dsv3.trainer")
        self.loss = meter.create_gauge("dsv3_trainer_loss", description="next-token loss of the last step")
        self.rate = meter.create_gauge("dsv3_trainer_tokens_per_second", unit="1/s")
        self.max_vio = meter.create_gauge(
            "dsv3_trainer_max_vio", description="max / mean expert load - 1, per MoE gate, last step"
        )
        self.step_time = meter.create_histogram("dsv3_trainer_step_duration", unit="s")
        self.tokens = meter.create_counter("dsv3_trainer_tokens", description="training tokens consumed")
        self.anomalies = meter.create_counter("dsv3_trainer_anomalies", description="anomalies by kind")
        self.step_value = meter.create_gauge("dsv3_trainer_step")

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[Any]:
        with self.tracer.start_as_current_span(
            "train.step", attributes={"dsv3.step": step, "dsv3.rank": self.rank, "dsv3.job": self.job}
        ) as span:
            yield span

    @contextlib.contextmanager
    def checkpoint(self, step: int) -> Iterator[Any]:
        with self.tracer.start_as_current_span("train.checkpoint", attributes={"dsv3.step": step}) as span:
            yield span

    def record(self, step: int, loss: float, rate: float, max_vio: list[float], seconds: float, tokens: int,
               anomaly: str | None) -> None:  # fmt: skip
        if self.rank != 0:
            return
        job = {"job": self.job}
        self.loss.set(loss, job)
        self.rate.set(rate, job)
        self.step_value.set(step, job)
        self.step_time.record(seconds, job)
        self.tokens.add(tokens, job)
        for gate, value in enumerate(max_vio):
            self.max_vio.set(value, {**job, "gate": str(gate)})
        if anomaly is not None:
            self.anomalies.add(1, {**job, "kind": anomaly})
