"""What rank 0 remembers and exports about its work: the last requests and errors, tokens
per second, and the Prometheus metrics. No MLX.

One ``Observer`` per app, each with its own ``CollectorRegistry`` (tests build several
apps in one process). Counters and histograms are updated where requests start, stream
and end (``watch``) and where errors leave the server (``error``); the cluster's gauges
(memory, liveness, queue, link) are read from one snapshot at scrape time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, field
from time import perf_counter
from time import time as wall_time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

REQUEST_HISTORY = 200
ERROR_HISTORY = 50
ERROR_MESSAGE_CHARS = 1000
RATE_SECONDS = 60  # the tokens/s series: one bucket per second

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
MEMORY_KINDS = ("active", "peak", "cache", "prompt_cache", "rss", "malloc_in_use", "malloc_free")


@dataclass
class RequestRecord:
    """One generation request, from admission to its end (``status`` "running" until then)."""

    route: str
    prompt_tokens: int
    time: float = field(default_factory=wall_time)
    completion_tokens: int = 0
    ttft_s: float | None = None
    duration_s: float | None = None
    tok_s: float | None = None  # decode speed: tokens after the first / time after the first
    status: str = "running"  # stop | length | cancelled | error
    error: str | None = None
    _start: float = field(default_factory=perf_counter, repr=False)

    def public(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class ErrorRecord:
    route: str
    status: int
    type: str
    message: str
    time: float = field(default_factory=wall_time)


class Observer:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the output and nobody graphs them
        self.registry = CollectorRegistry()
        self.requests: deque[RequestRecord] = deque(maxlen=REQUEST_HISTORY)
        self.errors: deque[ErrorRecord] = deque(maxlen=ERROR_HISTORY)
        self._rate: deque[list[int]] = deque(maxlen=RATE_SECONDS + 1)  # [second, tokens]
        r = self.registry
        self.http_requests = Counter(
            "mjc_http_requests", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        self.errors_total = Counter(
            "mjc_errors", "Errors sent to clients, by route and OpenAI error type.", ["route", "type"], registry=r
        )
        self.generations = Counter(
            "mjc_generations", "Generation requests by route and how they ended.", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "mjc_prompt_tokens", "Prompt tokens of generation requests.", ["route"], registry=r
        )
        self.generated_tokens = Counter("mjc_generated_tokens", "Tokens generated.", ["route"], registry=r)
        self.ttft = Histogram(
            "mjc_time_to_first_token_seconds",
            "Time from admission to the first token.",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.token_latency = Histogram(
            "mjc_time_per_output_token_seconds",
            "Mean time per generated token after the first, one sample per request.",
            ["route"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )

    # --- recording -----------------------------------------------------------------
    async def watch(self, route: str, prompt_tokens: int, pieces: AsyncIterator) -> AsyncIterator:
        """Pass a generation's pieces through, recording its first token, tokens and end."""
        rec = RequestRecord(route=route, prompt_tokens=prompt_tokens)
        self.requests.append(rec)
        self.prompt_tokens.labels(route).inc(prompt_tokens)
        generated = self.generated_tokens.labels(route)  # looked up once, not per piece
        status, error, first = "cancelled", None, None
        try:
            async for item in pieces:
                n = len(getattr(item, "events", ()))
                if n:
                    now = perf_counter()
                    if first is None:
                        first = now
                        rec.ttft_s = now - rec._start
                        self.ttft.labels(route).observe(rec.ttft_s)
                    rec.completion_tokens += n
                    generated.inc(n)
                    self._count(n)
                status = getattr(item, "finish_reason", None) or status
                yield item
        except Exception as exc:
            status, error = "error", getattr(exc, "message", str(exc))
            raise
        finally:
            end = perf_counter()
            rec.duration_s = end - rec._start
            if first is not None and rec.completion_tokens > 1 and end > first:
                per_token = (end - first) / (rec.completion_tokens - 1)
                rec.tok_s = 1.0 / per_token
                self.token_latency.labels(route).observe(per_token)
            rec.status, rec.error = status, error
            self.generations.labels(route, status).inc()

    def error(self, route: str, status: int, type: str, message: str) -> None:
        if len(message) > ERROR_MESSAGE_CHARS:  # a message may quote its input: keep the history small
            message = message[:ERROR_MESSAGE_CHARS] + "..."
        self.errors.append(ErrorRecord(route=route, status=status, type=type, message=message))
        self.errors_total.labels(route, type).inc()

    def _count(self, tokens: int) -> None:
        second = int(wall_time())
        if self._rate and self._rate[-1][0] == second:
            self._rate[-1][1] += tokens
        else:
            self._rate.append([second, tokens])

    # --- reading -------------------------------------------------------------------
    def tokens_per_second(self, now: float | None = None) -> list[int]:
        """Tokens generated in each of the last ``RATE_SECONDS`` whole seconds, oldest first."""
        last = int(now if now is not None else wall_time()) - 1
        counts = {s: n for s, n in self._rate}
        return [counts.get(s, 0) for s in range(last - RATE_SECONDS + 1, last + 1)]

    def request_history(self) -> list[dict]:
        return [r.public() for r in reversed(self.requests)]

    def error_history(self) -> list[dict]:
        return [asdict(e) for e in reversed(self.errors)]

    def watch_cluster(self, snapshot: Callable[[], dict]) -> None:
        """Export the cluster gauges from ``snapshot()`` (the dashboard's /dashboard/state)."""
        self.registry.register(_ClusterCollector(snapshot))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class _ClusterCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot()
        for name, doc, key in (
            ("mjc_world_size", "Ranks in the group.", "world_size"),
            ("mjc_ranks_up", "Ranks alive and ready, as rank 0 sees them.", "ranks_up"),
            ("mjc_queue_depth", "Admitted requests waiting for a batch slot.", "queue_depth"),
            ("mjc_inflight_requests", "Admitted requests (generating or waiting).", "inflight"),
            ("mjc_batch_size", "Sequences in the engine's batch.", "batch_size"),
        ):
            g = _gauge(name, doc)
            g.add_metric([], s[key])
            yield g
        up = _gauge("mjc_rank_up", "1 while the rank beats and is ready.", ["rank", "host"])
        silent = _gauge("mjc_rank_heartbeat_age_seconds", "Seconds since rank 0 last heard from the rank.", ["rank"])
        memory = _gauge(
            "mjc_rank_memory_bytes",
            "MLX memory (active, peak, cache; prompt_cache: the part of active the prompt cache holds), "
            "process RSS and, with glibc 2.33 or later, malloc's heaps (malloc_in_use; malloc_free: freed but "
            "kept) of each rank, from its last heartbeat.",
            ["rank", "kind"],
        )
        for r in s["ranks"]:
            rank = str(r["rank"])
            up.add_metric([rank, r["host"]], 1 if r["up"] else 0)
            if r["silent_s"] is not None:
                silent.add_metric([rank], r["silent_s"])
            for kind in MEMORY_KINDS:
                if kind in r["memory"]:
                    memory.add_metric([rank, kind], r["memory"][kind])
        yield from (up, silent, memory)
        link = s["link"]
        for name, doc, key in (
            ("mjc_link_latency_seconds", "Median 1-element all_sum time of the last idle-time probe.", "latency_s"),
            (
                "mjc_link_bandwidth_bytes_per_second",
                "Message size / median all_sum time of the last bandwidth probe.",
                "bandwidth_bps",
            ),
            (
                "mjc_link_probe_last_step_seconds",
                "Duration of the last link-probe step (the most a request waited).",
                "last_step_s",
            ),
        ):
            if link[key] is not None:
                g = _gauge(name, doc)
                g.add_metric([], link[key])
                yield g
        probes = CounterMetricFamily("mjc_link_probes", "Link probes completed.")
        probes.add_metric([], link["probes"])
        yield probes


class CountRequests:
    """ASGI middleware: ``mjc_http_requests_total{route, status}`` for every HTTP request
    (route: the matched route's path, "other" for none). Plain ASGI, so streaming and
    disconnect detection pass through untouched."""

    def __init__(self, app, observer: Observer):
        self.app = app
        self.observer = observer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.observer.http_requests.labels(route_label(scope), str(status)).inc()


def route_label(scope) -> str:
    """The matched route's path (bounded label values), or "other"."""
    return getattr(scope.get("route"), "path", None) or "other"
