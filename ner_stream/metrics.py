"""Every metric of the worker, defined once, and the HTTP server for /metrics, /healthz, /readyz.

Metrics live in a registry owned by one `Metrics` object (no process-global registry), so tests
and several workers in one process do not collide.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from ner_stream.messages import RejectReason

PREFIX = "ner_stream"
STAGES = ("decode", "tokenize", "batch_wait", "inference", "spans", "produce", "commit")
OUTCOMES = ("ok", "dead_letter")
TRANSACTION_RESULTS = ("committed", "aborted")
SWAP_RESULTS = ("swapped", "refused")

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
_DOCS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_RATIO = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class Metrics:
    """The worker's metrics, in their own registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        p = PREFIX
        self.documents = Counter(
            f"{p}_documents", "Documents finished, by outcome.", ["outcome"], registry=r
        )
        self.dead_letters = Counter(
            f"{p}_dead_letters", "Documents sent to the dead-letter topic, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.tokens = Counter(f"{p}_tokens", "Tokens tagged.", registry=r)
        self.entities = Counter(f"{p}_entities", "Entities found, by type.", ["type"], registry=r)
        self.batches = Counter(f"{p}_batches", "Forward passes run.", registry=r)
        self.rebalances = Counter(
            f"{p}_rebalances",
            "Partitions revoked, lost (removed from the group) and assigned.",
            ["kind"],
            registry=r,
        )
        self.commits = Counter(f"{p}_commits", "Offset commits, by result.", ["result"], registry=r)
        self.transactions = Counter(
            f"{p}_transactions", "Kafka transactions ended (exactly-once), by result.", ["result"],
            registry=r,
        )  # fmt: skip
        self.transaction_seconds = Histogram(
            f"{p}_transaction_seconds",
            "From a transaction's first record to its commit or abort (exactly-once).",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.model_restarts = Counter(
            f"{p}_model_restarts", "Model processes started again after one died.", registry=r
        )
        self.model_swaps = Counter(
            f"{p}_model_swaps",
            "New model files taken up by the running worker (swapped) or turned down (refused).",
            ["result"], registry=r,
        )  # fmt: skip
        self.batch_docs = Histogram(
            f"{p}_batch_documents", "Documents per micro-batch.", buckets=_DOCS, registry=r
        )
        self.batch_tokens = Histogram(
            f"{p}_batch_tokens", "Padded tokens per forward pass.", buckets=_TOKENS, registry=r
        )
        self.padding_ratio = Histogram(
            f"{p}_padding_ratio", "Share of a forward pass that is padding.", buckets=_RATIO,
            registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            f"{p}_stage_seconds", "Time spent per stage of the flow (per batch or per record).",
            ["stage"], buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.end_to_end = Histogram(
            f"{p}_end_to_end_seconds",
            "From the input record's timestamp to its output acknowledged by the broker.",
            buckets=_LATENCY,
            registry=r,
        )
        self.lag = Gauge(
            f"{p}_consumer_lag", "Records behind the end of each input partition.",
            ["topic", "partition"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(f"{p}_queue_depth", "Documents waiting to be tagged.", registry=r)
        self.paused = Gauge(
            f"{p}_paused_partitions", "Input partitions paused by backpressure.", registry=r
        )
        self.in_flight = Gauge(
            f"{p}_documents_in_flight", "Consumed documents not yet acknowledged.", registry=r
        )
        self.assigned = Gauge(f"{p}_assigned_partitions", "Input partitions owned.", registry=r)
        self.model = Info(f"{p}_model", "The model being served.", registry=r)
        # Children looked up once: the per-record paths observe them without a label lookup.
        self.stage = {stage: self.stage_seconds.labels(stage) for stage in STAGES}
        self.outcome = {outcome: self.documents.labels(outcome) for outcome in OUTCOMES}
        self.transaction = {r: self.transactions.labels(r) for r in TRANSACTION_RESULTS}
        self.swaps = {result: self.model_swaps.labels(result) for result in SWAP_RESULTS}
        # Zero series from the start, so that dashboards show 0 rather than "no data".
        for reason in RejectReason:
            self.dead_letters.labels(str(reason))
        # Memory, CPU and start time of the process, for spotting leaks and restarts.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def observe_batch(self, docs: int, real_tokens: int, shapes: list[tuple[int, int]]) -> None:
        """Record one micro-batch and its forward passes ((rows, padded length) of each tensor)."""
        self.batch_docs.observe(docs)
        self.tokens.inc(real_tokens)
        padded = 0
        for n, t in shapes:
            self.batches.inc()
            self.batch_tokens.observe(n * t)
            padded += n * t
        if padded:
            self.padding_ratio.observe(1.0 - real_tokens / padded)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


@dataclass
class Health:
    """What /healthz and /readyz report; updated by the worker, read by the HTTP server."""

    stale_after_s: float = 30.0
    model_loaded: bool = False
    assigned: int = 0
    last_progress: float = field(default_factory=time.monotonic)

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def healthy(self) -> bool:
        return time.monotonic() - self.last_progress < self.stale_after_s

    def ready(self) -> bool:
        return self.model_loaded and self.assigned > 0


class MetricsServer:
    """A small HTTP server on its own thread: /metrics, /healthz, /readyz."""

    def __init__(self, metrics: Metrics, health: Health, host: str, port: int) -> None:
        handler = _handler(metrics, health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http")
        self._thread.daemon = True

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(metrics: Metrics, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.healthy()
                self._send(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
            elif path == "/readyz":
                ok = health.ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass  # scrapes every few seconds would drown the worker's own log

    return Handler
