"""The router's spans: one trace per request, through its batch steps and MoE layers to the shards.

- A request remembers the trace context it was submitted in (the gRPC `Generate` server span of the
  OpenTelemetry interceptor, or the HTTP request's span that FastAPI's own telemetry opens). Every batch
  step it takes part in is a span in that trace: parented to the oldest request of the batch, linked
  to the others (a step serves several requests at once).
- Inside a step (the model thread), each MoE layer's dispatch is a `moe.layer` span; the shard calls
  it fans out on the event loop run in its context, so their gRPC client spans (and the shards' server
  spans, through `traceparent` metadata) are its children. The hot `Compute` calls are traced here,
  per call, rather than by a channel interceptor: grpc.aio's interceptor pipeline alone cost ~8% of
  decode tokens/s (benchmarks/bench_tracing.py). Only a sampled step's shard work goes through unary
  `Compute` calls, which carry the trace in their metadata; every other step uses the shards' open
  `ComputeStream`s, whose messages carry none (so the shards see no span for them).

With tracing off (no exporter configured) every function here is a plain pass-through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

from dsv3.serving import telemetry

T = TypeVar("T")


def enabled() -> bool:
    return telemetry.tracing_on()


def recording() -> bool:
    """True inside a sampled span: the shard calls made here are traced (per call, with metadata)."""
    if not enabled():
        return False
    from opentelemetry import trace

    return trace.get_current_span().is_recording()


def current() -> Any:
    """The caller's trace context (None while tracing is off)."""
    if not enabled():
        return None
    from opentelemetry import context

    return context.get_current()


def _tracer() -> Any:
    return telemetry.tracer("dsv3.router")


def in_step(name: str, contexts: Sequence[Any], batch: int, fn: Callable[[], T]) -> Callable[[], T]:
    """`fn` wrapped to run (on the model thread) as a step span of the requests' traces. A batch with no
    sampled request gets no span at all, only its context (so the shards learn "not sampled")."""
    if not enabled() or not contexts:
        return fn
    from opentelemetry import context, trace

    sampled = [c for c in contexts if trace.get_current_span(c).get_span_context().trace_flags.sampled]
    if not sampled:

        def unsampled() -> T:
            token = context.attach(contexts[0])
            try:
                return fn()
            finally:
                context.detach(token)

        return unsampled
    parent, *others = sampled + [c for c in contexts if c not in sampled]
    links = []
    for ctx in others:
        span_context = trace.get_current_span(ctx).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context))

    def traced() -> T:
        with _tracer().start_as_current_span(
            name, context=parent, links=links, attributes={"dsv3.batch": batch}
        ):
            return fn()

    return traced


@contextlib.contextmanager
def layer_span(layer: int, rows: int) -> Iterator[Any]:
    """The span of one MoE layer's dispatch (only in a sampled step); yields the context its shard calls
    should run in."""
    if not enabled():
        yield None
        return
    from opentelemetry import context, trace

    if not trace.get_current_span().is_recording():
        yield context.get_current()
        return
    with _tracer().start_as_current_span("moe.layer", attributes={"dsv3.layer": layer, "dsv3.rows": rows}):
        yield context.get_current()


async def run_in(ctx: Any, coroutine: Awaitable[T]) -> T:
    """Await `coroutine` with `ctx` attached (a coroutine handed to the loop from another thread)."""
    if ctx is None:
        return await coroutine
    from opentelemetry import context

    token = context.attach(ctx)
    try:
        return await coroutine
    finally:
        context.detach(token)


@contextlib.contextmanager
def client_call(method: str, peer: str) -> Iterator[tuple[tuple[str, str], ...]]:
    """Around one shard call made inside a sampled span (`recording()`): a CLIENT span (named like the
    interceptors' ones); yields the metadata carrying its context."""
    from opentelemetry import propagate, trace

    attributes = {"rpc.system": "grpc", "rpc.method": method.rsplit("/", 1)[-1], "net.peer.name": peer}
    with _tracer().start_as_current_span(method, kind=trace.SpanKind.CLIENT, attributes=attributes):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield tuple(carrier.items())
