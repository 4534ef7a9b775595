"""Prometheus metrics of the router: HTTP requests, tokens, latency, the engine's own counters, placement.

One `CollectorRegistry` per router (no process-global state). The engine knows nothing of Prometheus:
`EngineCollector` reads its counters (requests waiting and running, decode steps, speculative drafts
proposed and accepted, which cover gRPC `Generate` as well as HTTP) at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dsv3.router.engine import Engine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineCollector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        engine = self.engine
        yield GaugeMetricFamily("dsv3_requests_running", "Requests in the decode batch", len(engine.active))
        yield GaugeMetricFamily(
            "dsv3_requests_waiting", "Requests waiting for a cache slot", len(engine.waiting)
        )
        yield CounterMetricFamily("dsv3_decode_steps", "Decode forwards run (one per step)", engine.steps)
        yield CounterMetricFamily(
            "dsv3_spec_draft_tokens", "MTP draft tokens verified by the main model", engine.drafted
        )
        yield CounterMetricFamily(
            "dsv3_spec_accepted_tokens", "MTP draft tokens the main model accepted", engine.accepted
        )
        yield CounterMetricFamily(
            "dsv3_decode_seconds", "Model time of decode steps (MTP drafting included)", engine.decode_seconds
        )
        mtp = engine.speculator.mtp_seconds if engine.speculator is not None else 0.0
        yield CounterMetricFamily(
            "dsv3_spec_mtp_seconds", "Model time of the MTP drafts in decode steps", mtp
        )


class PlacementCollector:
    """The expert placement (`Placer`): version, changes, the last change's moves and balancedness."""

    def __init__(self, placer, shards=None) -> None:
        self.placer = placer
        self.shards = shards  # address -> Shard (the pool's), for shard health

    def collect(self):
        placer = self.placer
        if self.shards is not None:
            health = GaugeMetricFamily("dsv3_shard_up", "1 while a shard is live", labels=["shard"])
            for address, shard in list(self.shards.items()):
                health.add_metric([address], 1.0 if shard.live else 0.0)
            yield health
        yield GaugeMetricFamily("dsv3_placement_version", "Current expert-placement version", placer.version)
        yield CounterMetricFamily("dsv3_placement_changes", "Placement changes applied", placer.changes)
        last = placer.last
        yield GaugeMetricFamily(
            "dsv3_placement_slots_moved", "Slots loaded for the last change", last.slots_moved if last else 0
        )
        balance = GaugeMetricFamily(
            "dsv3_placement_balancedness", "max / mean shard load of the load window", labels=["when"]
        )
        if last is not None:
            balance.add_metric(["before"], last.balancedness_before)
            balance.add_metric(["after"], last.balancedness_after)
        balance.add_metric(["now"], placer.window_balancedness())
        yield balance


class RouterMetrics:
    def __init__(self, engine: Engine, placer=None, shards=None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        if placer is not None:
            self.registry.register(PlacementCollector(placer, shards))
        self.requests = Counter(
            "dsv3_http_requests",
            "HTTP API requests by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "dsv3_prompt_tokens", "Prompt tokens of HTTP API requests", registry=self.registry
        )
        self.generation_tokens = Counter(
            "dsv3_generation_tokens", "Tokens generated for HTTP API requests", registry=self.registry
        )
        self.latency = Histogram(
            "dsv3_request_seconds",
            "End-to-end HTTP API request time",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "dsv3_time_to_first_token_seconds",
            "Time from request to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
