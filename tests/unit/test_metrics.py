"""Metrics and the /metrics, /healthz, /readyz server (on 127.0.0.1, an ephemeral port)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from ner_stream.metrics import Health, Metrics, MetricsServer


@pytest.fixture
def served() -> Iterator[tuple[Metrics, Health, str]]:
    metrics, health = Metrics(), Health(stale_after_s=30.0)
    server = MetricsServer(metrics, health, "127.0.0.1", 0).start()
    try:
        yield metrics, health, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


# Straight to the server, whatever proxy the environment names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, errors included."""
    try:
        with _OPENER.open(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_metrics_endpoint_serves_prometheus_text(served):
    metrics, _, base = served
    metrics.documents.labels("ok").inc(3)
    metrics.dead_letters.labels("invalid_utf8").inc()
    status, ctype, body = get(base + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    assert 'ner_stream_documents_total{outcome="ok"} 3.0' in body
    assert 'ner_stream_documents_total{outcome="dead_letter"} 0.0' in body  # pre-created
    assert 'ner_stream_dead_letters_total{reason="invalid_utf8"} 1.0' in body
    assert "# TYPE ner_stream_stage_seconds histogram" in body
    for stage in ("decode", "tokenize", "inference", "commit"):
        assert f'ner_stream_stage_seconds_count{{stage="{stage}"}} 0.0' in body
    # A query string does not change the route.
    assert get(base + "/metrics?name[]=x")[0] == 200


def test_healthz_turns_503_when_the_loop_stops_making_progress(served):
    _, health, base = served
    status, _, body = get(base + "/healthz")
    assert (status, body) == (200, "ok\n")
    health.last_progress = time.monotonic() - 31.0
    status, _, body = get(base + "/healthz")
    assert (status, body) == (503, "stalled\n")
    health.progressed()
    assert get(base + "/healthz")[0] == 200


def test_readyz_waits_for_the_model_and_a_partition(served):
    _, health, base = served
    assert get(base + "/readyz")[0] == 503
    health.model_loaded = True
    assert get(base + "/readyz")[0] == 503  # no partition yet
    health.assigned = 2
    status, _, body = get(base + "/readyz")
    assert (status, body) == (200, "ready\n")
    health.assigned = 0  # all partitions revoked
    assert get(base + "/readyz")[0] == 503


def test_an_unknown_path_is_404(served):
    assert get(served[2] + "/nope")[0] == 404


def test_observe_batch_records_padding_and_tokens():
    m = Metrics()
    m.observe_batch(docs=3, real_tokens=30, shapes=[(2, 16), (1, 8)])  # 40 padded positions
    value = m.registry.get_sample_value
    assert value("ner_stream_tokens_total") == 30
    assert value("ner_stream_batches_total") == 2
    assert value("ner_stream_batch_documents_count") == 1
    assert value("ner_stream_batch_documents_sum") == 3
    assert value("ner_stream_batch_tokens_count") == 2
    assert value("ner_stream_batch_tokens_sum") == 40
    assert value("ner_stream_padding_ratio_count") == 1
    assert value("ner_stream_padding_ratio_sum") == pytest.approx(0.25)  # 1 - 30 / 40
    # The ratio falls in the 0.3 bucket, not the 0.2 one.
    assert value("ner_stream_padding_ratio_bucket", {"le": "0.2"}) == 0
    assert value("ner_stream_padding_ratio_bucket", {"le": "0.3"}) == 1


def test_a_batch_without_forward_passes_records_no_padding_ratio():
    m = Metrics()
    m.observe_batch(docs=1, real_tokens=0, shapes=[])  # an empty document
    assert m.registry.get_sample_value("ner_stream_padding_ratio_count") == 0
    assert m.registry.get_sample_value("ner_stream_batch_documents_count") == 1


def test_two_metrics_objects_do_not_collide():
    a, b = Metrics(), Metrics()  # a shared registry would raise "Duplicated timeseries"
    a.documents.labels("ok").inc(5)
    b.documents.labels("ok").inc(1)
    assert a.registry.get_sample_value("ner_stream_documents_total", {"outcome": "ok"}) == 5
    assert b.registry.get_sample_value("ner_stream_documents_total", {"outcome": "ok"}) == 1
    assert b"ner_stream_documents_total" in a.exposition()
