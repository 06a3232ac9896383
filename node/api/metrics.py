"""Prometheus metrics, one registry per app (tests run several apps in one process)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from node.adapters.ipfs.supervisor import NodeSupervisor
from node.api.errors import Handler
from node.api.keys import METRICS

# Seconds. Whole requests run from milliseconds (a short answer) to minutes (a long stream).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

disable_created_metrics()  # no `*_created` series: they double the exposition and no dashboard reads them

MAX_ADAPTER_LABELS = 100

# Status recorded when the client disconnected before the response was complete (nginx's 499).
CLIENT_CLOSED = "499"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("openlora_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.request_latency = Histogram(
            "openlora_request_duration_seconds", "Request latency, to the end of the response",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "openlora_time_to_first_token_seconds", "Request arrival to the first generated token",
            ["endpoint"], buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("openlora_prompt_tokens", "Prompt tokens processed", ["endpoint"], registry=r)
        self.completion_tokens = Counter(
            "openlora_completion_tokens", "Completion tokens generated", ["endpoint"], registry=r
        )
        self.running = Gauge("openlora_requests_running", "Sequences in the engine's running batch", registry=r)
        self.waiting = Gauge("openlora_requests_waiting", "Sequences queued for admission", registry=r)
        self.kv_blocks_used = Gauge("openlora_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge("openlora_kv_blocks_total", "KV-cache blocks in the pool", registry=r)
        self.warmup_seconds = Gauge(
            "openlora_warmup_seconds", "The warm-up generation run at start, before the node serves", registry=r
        )
        self.prefix_cache = Counter(
            "openlora_prefix_cache_tokens", "Prompt tokens at admission, found in the prefix cache (hit) or not (miss)",
            ["result"], registry=r,
        )  # fmt: skip
        # Attribution (a node with a chain). Adapter labels are bounded: past MAX_ADAPTER_LABELS, "other".
        self.paid_requests = Counter("openlora_paid_requests", "Signed requests recorded", ["adapter"], registry=r)
        self.paid_tokens = Counter(
            "openlora_paid_tokens", "Tokens of signed requests recorded", ["adapter", "kind"], registry=r
        )
        self.revenue = Counter(
            "openlora_charged_wei", "OPEN wei charged by usage records (adapter share and node fee)", ["adapter"],
            registry=r,
        )  # fmt: skip
        self.refusals = Counter("openlora_request_refusals", "Signed requests refused, by code", ["code"], registry=r)
        self.journal_entries = Gauge(
            "openlora_journal_entries", "Usage journal entries by state", ["state"], registry=r
        )
        self.batches = Gauge(
            "openlora_batches", "Batches this node committed, finalized, voided", ["event"], registry=r
        )
        self.chain_errors = Gauge(
            "openlora_submitter_errors", "Submitter failures (chain, IPFS) since start", registry=r
        )
        self.tx_replacements = Gauge(
            "openlora_tx_replacements", "Transactions sent again with higher fees after waiting unmined", registry=r
        )
        self.commit_lag = Gauge(
            "openlora_commit_lag_seconds", "Age of the oldest record not yet in a batch (0: none waiting)", registry=r
        )
        self._adapter_labels: dict[str, str] = {}  # insertion-ordered set of labelled adapters

    def watch_adapters(self, stats: Callable[[], dict]) -> None:
        """Export the engine's adapter tiers and refusals, read at every scrape."""
        self.registry.register(_AdapterCollector(stats))

    def watch_adapter_cache(self, stats: Callable[[], dict[str, int]]) -> None:
        """Export the adapter disk cache's size and the crash leftovers removed, read at every scrape."""
        self.registry.register(_AdapterCacheCollector(stats))

    def watch_local_ipfs(self, supervisor: NodeSupervisor) -> None:
        """Export whether the supervised local IPFS node is up, and how often it died and came back."""
        self.registry.register(_LocalIpfsCollector(supervisor))

    def observe_tokens(self, endpoint: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.labels(endpoint).inc(prompt_tokens)
        self.completion_tokens.labels(endpoint).inc(completion_tokens)

    def adapter_label(self, adapter: str) -> str:
        """The adapter's label ("base" for the base model); the first MAX_ADAPTER_LABELS get their own."""
        name = adapter or "base"
        if name in self._adapter_labels:
            return name
        if len(self._adapter_labels) >= MAX_ADAPTER_LABELS:
            return "other"
        self._adapter_labels[name] = name
        return name

    def observe_record(self, adapter: str, input_tokens: int, output_tokens: int, charge: int) -> None:
        label = self.adapter_label(adapter)
        self.paid_requests.labels(label).inc()
        self.paid_tokens.labels(label, "input").inc(input_tokens)
        self.paid_tokens.labels(label, "output").inc(output_tokens)
        self.revenue.labels(label).inc(charge)

    def render(self, engine_stats: Mapping[str, int]) -> bytes:
        """The exposition text, with the engine gauges sampled now."""
        self.running.set(engine_stats["running"])
        self.waiting.set(engine_stats["waiting"])
        self.kv_blocks_used.set(engine_stats["kv_blocks_used"])
        self.kv_blocks_total.set(engine_stats["kv_blocks_total"])
        for result in ("hit", "miss"):  # the engine counts since its start; the counter follows
            counter = self.prefix_cache.labels(result)
            counter.inc(max(0, engine_stats[f"prefix_cache_{result}_tokens"] - counter._value.get()))
        return generate_latest(self.registry)


class _AdapterCollector(Collector):
    def __init__(self, stats: Callable[[], dict]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        tiers = GaugeMetricFamily("openlora_adapters_resident", "Adapters resident per tier", labels=["tier"])
        tiers.add_metric(["host"], s["host"])
        tiers.add_metric(["device"], s["device"])
        yield tiers
        loads = CounterMetricFamily("openlora_adapter_loads", "Adapters loaded into a tier", labels=["tier"])
        loads.add_metric(["host"], s["loads"])
        loads.add_metric(["device"], s["device_loads"])
        yield loads
        failures = CounterMetricFamily(
            "openlora_adapter_failures", "Adapters refused or not fetched, by reason", labels=["reason"]
        )
        for reason, n in sorted(s["failures"].items()):
            failures.add_metric([reason], n)
        yield failures


class _AdapterCacheCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        size = GaugeMetricFamily(
            "openlora_adapter_cache_bytes", "Adapter disk cache: verified adapters and downloads in progress",
            labels=["state"],
        )  # fmt: skip
        size.add_metric(["verified"], s.get("verified_bytes", 0))
        size.add_metric(["partial"], s.get("partial_bytes", 0))
        yield size
        yield CounterMetricFamily(
            "openlora_adapter_cache_leftovers_removed",
            "Partial downloads of a dead process (crash, kill) removed from the adapter cache at start",
            value=s.get("leftovers_removed", 0),
        )


class _LocalIpfsCollector(Collector):
    def __init__(self, supervisor: NodeSupervisor) -> None:
        self._supervisor = supervisor

    def collect(self):
        s = self._supervisor
        yield GaugeMetricFamily("openlora_local_ipfs_up", "The local IPFS node serve started is up (1) or not", s.up)
        yield CounterMetricFamily("openlora_local_ipfs_exits", "Exits of the local IPFS node noticed", s.deaths)
        yield CounterMetricFamily("openlora_local_ipfs_restarts", "Restarts of the local IPFS node", s.restarts)


def endpoint_label(request: web.Request) -> str:
    """The route's path template; one label for every unrouted path, so scanners can't explode cardinality."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    endpoint = endpoint_label(request)
    start = time.perf_counter()
    status = CLIENT_CLOSED  # unless a response or an HTTP exception says otherwise
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except web.HTTPException as exc:  # below 400: the error middleware lets these through
        status = str(exc.status)
        raise
    finally:
        metrics.requests.labels(endpoint, status).inc()
        metrics.request_latency.labels(endpoint).observe(time.perf_counter() - start)
