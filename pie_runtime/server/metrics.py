"""`GET /metrics`: the server's state in Prometheus text format (prometheus_client).

Everything is read when scraped, from the serving core's statistics, the
page pool and the instance registry, so no hot path pays for metrics.
Counters only grow; take `rate()` of the token counters for tokens/s.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

import threading

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from pie_runtime.stats import STEP_SECONDS_BUCKETS

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerCollector(Collector):
    def __init__(self, state: Any) -> None:
        self.state = state  # pie_runtime.server.app.ServerState

    def collect(self) -> Iterator[Any]:
        state = self.state
        phase = GaugeMetricFamily("pie_server_ready", "1 when the engine is serving, 0 while starting or draining")
        phase.add_metric([], 1.0 if state.phase == "ready" else 0.0)
        yield phase
        threads = GaugeMetricFamily("pie_threads", "threads of the server process (one per running instance, "
                                                   "plus a fixed few)")
        threads.add_metric([], threading.active_count())
        yield threads
        errors = CounterMetricFamily("pie_errors", "errors returned to clients, by code", labels=["code"])
        for code, count in sorted(state.errors.items()):
            errors.add_metric([code], count)
        yield errors
        requests = CounterMetricFamily("pie_openai_requests", "OpenAI-API requests answered, by endpoint and status",
                                       labels=["endpoint", "status"])
        for (endpoint, status), count in sorted(state.openai_requests.items()):
            requests.add_metric([endpoint, str(status)], count)
        yield requests
        runtime, registry = state.runtime, state.registry
        if runtime is None or registry is None:
            return
        yield from _engine_metrics(runtime.core.stats)
        pages = GaugeMetricFamily("pie_kv_pages", "KV pages of the pool by state", labels=["state"])
        free = runtime.core.free_pages()
        pages.add_metric(["free"], free)
        pages.add_metric(["used"], runtime.engine.num_pages - free)
        yield pages
        by_state, by_tenant = registry.counts()
        instances = GaugeMetricFamily("pie_instances", "instances by state (detached: running with no client)",
                                      labels=["state"])
        for name in ("running", "detached", "ended"):
            instances.add_metric([name], by_state.get(name, 0))
        yield instances
        tenants = GaugeMetricFamily("pie_tenant_instances", "running instances per tenant", labels=["tenant"])
        for tenant, count in sorted(by_tenant.items()):
            tenants.add_metric([tenant], count)
        yield tenants
        outcomes = CounterMetricFamily("pie_instance_outcomes", "ended instances by how they ended",
                                       labels=["status"])
        for status, count in sorted(registry.outcomes.items()):
            outcomes.add_metric([status], count)
        yield outcomes


def _engine_metrics(stats: Any) -> Iterator[Any]:
    steps = CounterMetricFamily("pie_engine_steps", "engine steps run")
    steps.add_metric([], stats.steps)
    yield steps
    yield _histogram("pie_engine_step_seconds", "wall time of one engine step", stats.step_seconds,
                     STEP_SECONDS_BUCKETS, stats.engine_seconds)
    batch_sum = sum(size * count for size, count in stats.batch_requests.items())
    yield _histogram("pie_batch_requests", "requests (sequences) batched into one engine step",
                     stats.batch_requests, BATCH_BUCKETS, batch_sum)
    tokens_in = CounterMetricFamily("pie_tokens_processed", "input tokens run through the model")
    tokens_in.add_metric([], stats.tokens_processed)
    yield tokens_in
    tokens_out = CounterMetricFamily("pie_tokens_generated", "tokens drawn by sample outputs")
    tokens_out.add_metric([], stats.tokens_generated)
    yield tokens_out
    failed = CounterMetricFamily("pie_forwards_failed", "forward passes that failed")
    failed.add_metric([], stats.forwards_failed)
    yield failed
    chunks = CounterMetricFamily("pie_prefill_chunks", "chunks run of forwards split by the token budget")
    chunks.add_metric([], stats.prefill_chunks)
    yield chunks


def _histogram(name: str, documentation: str, counts: Counter, bounds: tuple, total: float) -> HistogramMetricFamily:
    """A Prometheus histogram from {value (or a bucket's bound): count}."""
    buckets = [(repr(float(bound)), sum(count for value, count in counts.items() if value <= bound))
               for bound in bounds]
    buckets.append(("+Inf", sum(counts.values())))
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], buckets, sum_value=total)
    return family


def metrics_registry(state: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(state))
    ProcessCollector(registry=registry)  # process_open_fds, memory, CPU seconds
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
