"""OpenTelemetry for every dsv3 process: traces and metrics, configured by the standard `OTEL_*` variables.

- Traces: off unless asked for. `OTEL_TRACES_EXPORTER=otlp` (or just `OTEL_EXPORTER_OTLP_ENDPOINT`) sends
  OTLP/gRPC, `console` prints; sampling is the SDK's (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`,
  `OTEL_TRACES_SAMPLER_ARG=0.01` for 1%). `DSV3_TRACE_FILE=path` also appends every finished span as a
  JSON line (local runs and tests read traces from several processes that way).
- Context crosses processes in gRPC metadata (W3C `traceparent`), by the interceptors of
  opentelemetry-instrumentation-grpc, which `ServiceServer` and the synchronous clients install when
  tracing is on (with tracing off they are not installed at all, so an untraced service pays nothing);
  the router's hot `Compute` calls carry it per call instead (dsv3.router.tracing).
- Metrics: instruments from `meter(...)`; `serve_metrics(port)` exposes them (and anything registered
  with prometheus-client directly) for Prometheus scraping; `OTEL_METRICS_EXPORTER=otlp` also pushes.

Torch-free (the operator and the checkpoint server use it); `setup` is idempotent per process.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

_lock = threading.Lock()
_state: dict[str, Any] = {"service": None, "tracing": False, "metrics_server": None}
_handler_traced: set[str] = set()  # full method names whose handlers open their own server span


def tracing_requested() -> bool:
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "")
    wanted = [e.strip() for e in exporters.split(",") if e.strip() and e.strip() != "none"]
    return bool(wanted or os.environ.get("DSV3_TRACE_FILE") or
                (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") and not exporters))  # fmt: skip


class _JsonLinesExporter:
    """A SpanExporter writing one JSON object per finished span (ids in hex, times in ns)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for span in spans:
            parent = span.parent
            lines.append(json.dumps({
                "name": span.name,
                "service": span.resource.attributes.get("service.name"),
                "trace_id": f"{span.context.trace_id:032x}",
                "span_id": f"{span.context.span_id:016x}",
                "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
                "kind": span.kind.name,
                "start_ns": span.start_time,
                "end_ns": span.end_time,
                "status": span.status.status_code.name,
                "attributes": {k: v if isinstance(v, str | int | float | bool) else list(v)
                               for k, v in (span.attributes or {}).items()},
            }))  # fmt: skip
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def setup(service_name: str) -> bool:
    """Configure this process's tracer and meter providers once; True when tracing is on."""
    with _lock:
        if _state["service"] is not None:
            return _state["tracing"]
        _state["service"] = service_name
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        resource = Resource.create({"service.name": service_name})
        readers = _metric_readers()
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
        if not tracing_requested():
            return False
        provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER(_ARG)
        names = {e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
        if "otlp" in names and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        if "console" in names:
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        if path := os.environ.get("DSV3_TRACE_FILE"):
            provider.add_span_processor(SimpleSpanProcessor(_JsonLinesExporter(path)))
        trace.set_tracer_provider(provider)
        _state["tracing"] = True
        return True


def _metric_readers() -> list[Any]:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    readers: list[Any] = [PrometheusMetricReader()]  # into prometheus-client's default registry
    if os.environ.get("OTEL_METRICS_EXPORTER", "") == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    return readers


def shutdown() -> None:
    """Flush what is buffered (at process exit: a BatchSpanProcessor would otherwise lose the tail)."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def tracing_on() -> bool:
    """Whether `setup` turned tracing on in this process."""
    return _state["tracing"]


def tracer(name: str) -> Any:
    from opentelemetry import trace

    return trace.get_tracer(name)


def meter(name: str) -> Any:
    from opentelemetry import metrics

    return metrics.get_meter(name)


def serve_metrics(port: int, host: str = "0.0.0.0") -> int:
    """A Prometheus scrape endpoint (`/metrics`) on port (0: none); the port it listens on."""
    if port <= 0:
        return 0
    with _lock:
        if _state["metrics_server"] is None:
            from prometheus_client import start_http_server

            server, _ = start_http_server(port, addr=host)
            _state["metrics_server"] = server
        return _state["metrics_server"].server_port


def server_interceptors() -> list[Any]:
    """grpc.aio server interceptors that continue the caller's trace (none while tracing is off).

    A call whose `traceparent` says "not sampled" skips the span machinery altogether: at 1% sampling
    that is 99% of the calls, and the full interceptor's per-call cost showed in the tokens/s.
    """
    if not _state["tracing"]:
        return []
    import grpc
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    full = aio_server_interceptor()

    class _SampledOnly(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, handler_call_details):
            if handler_call_details.method in _handler_traced:
                return await continuation(handler_call_details)
            for key, value in handler_call_details.invocation_metadata or ():
                if key == "traceparent" and isinstance(value, str) and value.endswith("-00"):
                    return await continuation(handler_call_details)
            return await full.intercept_service(continuation, handler_call_details)

    return [_SampledOnly()]


def trace_in_handler(method: str) -> None:
    """Let `method`'s handler open its own span (`start_server_span`) instead of the interceptor: for a
    server-streaming RPC the interceptor's wrapper costs on every streamed message, sampled or not."""
    _handler_traced.add(method)


def start_server_span(method: str, metadata: Any) -> tuple[Any, Any]:
    """A SERVER span for one call, continuing the caller's `traceparent`: (span, its context), or
    (None, None) while tracing is off. The caller ends the span."""
    if not _state["tracing"]:
        return None, None
    from opentelemetry import propagate, trace

    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    service, _, name = method.strip("/").rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    span = tracer("dsv3.serving").start_span(
        method, context=propagate.extract(carrier), kind=trace.SpanKind.SERVER, attributes=attributes
    )
    return span, trace.set_span_in_context(span)


def traced_channel(channel: Any) -> Any:
    """A synchronous channel that sends the current trace context (the same channel while tracing is off)."""
    if not _state["tracing"]:
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    return intercept_channel(channel, client_interceptor())
