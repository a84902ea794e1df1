"""A real Prometheus scraping a real worker: the numbers add up, and every PromQL expression of the
Grafana dashboard and of the alert rules (read from deploy/, not copied here) runs against real
series.

One worker subprocess (`ner-stream run` with a tiny random-weight model) tags N documents plus a
few that are dead-lettered; a `prometheus` process started here (generated config, storage in a
temporary folder, 127.0.0.1 on a free port, 1 s scrape and rule evaluation, the rules of
deploy/prometheus/alerts.yml) scrapes it all along. Then, through Prometheus's HTTP API:

- `sum(ner_stream_documents_total{outcome="ok"})` is exactly N, and the dead letters add up;
- every dashboard query returns data (a non-empty result): the documents include dead letters so
  that the dead-letter panels have series too;
- every alert expression evaluates (`status: success`) and every metric it selects has series. An
  alert expression's result itself is legitimately empty on a healthy run (`up == 0`, lag growing,
  ...), so emptiness is not asserted; what each rule means is checked on synthetic series by
  tests/unit/test_deploy_files.py (promtool). Prometheus must also load the rule file and report
  every rule healthy after evaluating it;
- stopping the worker turns `up` to 0 and NerStreamWorkerDown to pending.

Needs `prometheus` on PATH (`make prometheus` installs Debian's package; `make test` does it
first); without it the module is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer

from tests import kafka_util
from tests.deploy_util import (
    ALERTS,
    JOB,
    alert_queries,
    alert_rules,
    dashboard_queries,
    grafana_to_promql,
    metric_names,
)
from tests.integration.worker_util import build_tiny_model

PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus is not on PATH: run `make prometheus` "
        "(deploy/prometheus/ensure-prometheus.sh installs Debian's prometheus package)",
    ),
]

N_DOCS = 300
# Dead letters, so that the dead-letter panels and alert have series: (value, reason).
BAD_RECORDS = [
    (b"[1, 2]", "not_an_object"),
    (b'{"id": "bad-1"}', "missing_text"),
    (b'{"id": "bad-2", "text": 5}', "text_not_string"),
    (b"\xff\xfe not utf-8", "invalid_utf8"),
]
RATE_INTERVAL = "1m"  # what $__rate_interval stands for here: many 1 s scrapes of the whole run
DEADLINE_S = 180.0  # generous: the test machine may be busy


# ------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(what: str, check: Callable[[], Any], timeout: float = DEADLINE_S,
             interval: float = 0.5, alive: Callable[[], None] | None = None) -> Any:  # fmt: skip
    """Poll `check` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def stop_process(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit code (None when killed)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return None


@dataclass
class Stack:
    """The running worker and Prometheus of this module, and what was produced."""

    prometheus_url: str
    worker: subprocess.Popen
    worker_log: Path
    prometheus_log: Path
    metrics_url: str

    def worker_alive(self) -> None:
        if self.worker.poll() is not None:
            pytest.fail(f"the worker exited with {self.worker.returncode}:\n"
                        f"{tail(self.worker_log)}")  # fmt: skip

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.prometheus_url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url, timeout=10)
        data = json.loads(body)
        assert status == 200 and data["status"] == "success", f"{url}: {status} {data}"
        return data["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query; the result vector (or a one-element list for a scalar)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"value": data["result"]}]
        return data["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


# ------------------------------------------------------------------------------ the stack


@pytest.fixture(scope="module")
def stack(kafka_bootstrap, topic_factory, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prometheus")
    input_topic = topic_factory(4, "prom-docs")
    output_topic = topic_factory(1, "prom-entities")
    dlq_topic = topic_factory(1, "prom-dlq")
    model = build_tiny_model(tmp / "tiny.nerm", name="tiny-prometheus")
    metrics_port, prometheus_port = free_port(), free_port()

    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    prometheus_log = tmp / "prometheus.log"
    worker_log = tmp / "worker.log"
    procs: list[tuple[subprocess.Popen, float]] = []
    try:
        with prometheus_log.open("wb") as log:
            prometheus = subprocess.Popen(
                [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
            )  # fmt: skip
        procs.append((prometheus, 15.0))
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"

        def prometheus_alive() -> None:
            if prometheus.poll() is not None:
                pytest.fail(f"prometheus exited with {prometheus.returncode}:\n"
                            f"{tail(prometheus_log)}")  # fmt: skip

        def prometheus_ready() -> bool:
            try:
                return http_get(f"{prometheus_url}/-/ready", timeout=2)[0] == 200
            except OSError:
                return False

        # The worker: one CPU thread for torch, it shares a small machine.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with worker_log.open("wb") as log:
            worker = subprocess.Popen(
                [str(Path(sys.executable).parent / "ner-stream"), "run",
                 "--bootstrap-servers", kafka_bootstrap,
                 "--input-topic", input_topic, "--output-topic", output_topic,
                 "--dlq-topic", dlq_topic, "--group-id", kafka_util.unique_name("prom-group"),
                 "--model", str(model), "--device", "cpu",
                 "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
                 "--commit-interval-ms", "200", "--shutdown-timeout-s", "20"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        procs.append((worker, 30.0))
        stack = Stack(prometheus_url, worker, worker_log, prometheus_log,
                      f"http://127.0.0.1:{metrics_port}")  # fmt: skip

        wait_for("prometheus to be ready", prometheus_ready, timeout=60, alive=prometheus_alive)

        def worker_ready() -> bool:
            try:
                return http_get(f"{stack.metrics_url}/readyz", timeout=2)[0] == 200
            except OSError:
                return False

        # Ready: the model is loaded and the group has handed the worker its partitions.
        wait_for("the worker to be ready", worker_ready, alive=stack.worker_alive)

        produce(kafka_bootstrap, input_topic)

        def all_outputs() -> set[bytes]:
            keys = read_keys(kafka_bootstrap, output_topic)
            return keys if len(keys) >= N_DOCS else set()

        outputs = wait_for(f"{N_DOCS} outputs on {output_topic}", all_outputs,
                           alive=stack.worker_alive)  # fmt: skip
        assert outputs == {f"doc-{i}".encode() for i in range(N_DOCS)}
        yield stack
    finally:
        for proc, timeout in reversed(procs):
            stop_process(proc, timeout)


def produce(bootstrap: str, topic: str) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                             request_timeout_ms=kafka_util.CLIENT_REQUEST_TIMEOUT_MS,
                             max_block_ms=kafka_util.CLIENT_REQUEST_TIMEOUT_MS)  # fmt: skip
    try:
        futures = []
        for i in range(N_DOCS):
            text = f"Peter went to Paris on day {i} . Acme went to Peter ."
            value = json.dumps({"id": f"doc-{i}", "text": text}).encode()
            futures.append(producer.send(topic, key=f"doc-{i}".encode(), value=value))
        for n, (value, _reason) in enumerate(BAD_RECORDS):
            futures.append(producer.send(topic, key=f"bad-{n}".encode(), value=value))
        producer.flush(timeout=30)
        for f in futures:
            f.get(timeout=1)  # re-raises a failed send
    finally:
        producer.close(timeout=10)


def read_keys(bootstrap: str, topic: str) -> set[bytes]:
    """The keys of every record of a topic, read from the beginning without a group."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=2000)  # fmt: skip
    try:
        return {record.key for record in consumer}
    finally:
        consumer.close()


# ------------------------------------------------------------------------------ the tests


def test_documents_total_equals_the_produced_count(stack):
    ok = 'sum(ner_stream_documents_total{outcome="ok"})'
    dead = 'sum(ner_stream_documents_total{outcome="dead_letter"})'
    # The outputs are all on the topic; the worker counts an acknowledgement on its next loop and
    # Prometheus sees it on its next scrape.
    wait_for(
        f"{ok} == {N_DOCS} and {dead} == {len(BAD_RECORDS)}",
        lambda: (stack.scalar(ok), stack.scalar(dead)) == (N_DOCS, len(BAD_RECORDS)),
        timeout=60,
    )
    assert stack.scalar(ok) == N_DOCS
    reasons = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in stack.query("sum by (reason) (ner_stream_dead_letters_total) > 0")
    }
    assert reasons == {reason: 1.0 for _value, reason in BAD_RECORDS}
    # Every tagged token and every finished document went through one micro-batch or another.
    assert stack.scalar("sum(ner_stream_tokens_total)") > 0
    assert stack.scalar("sum(ner_stream_batch_documents_sum)") >= N_DOCS
    (info,) = stack.query("ner_stream_model_info")
    assert info["metric"]["name"] == "tiny-prometheus" and info["metric"]["version"] == "0.0.1"


@pytest.mark.parametrize("query", dashboard_queries(), ids=lambda q: q.where)
def test_dashboard_query_returns_data(stack, query):
    expr = grafana_to_promql(query.expr, rate_interval=RATE_INTERVAL)
    # Lag is published every 5 s and rates need two scrapes: allow for a few scrapes.
    result = wait_for(f"data for {expr}", lambda: stack.query(expr), timeout=30)
    assert result


def test_dashboard_variables_have_values(stack):
    jobs = stack.api("label/job/values", **{"match[]": "ner_stream_model_info"})
    assert JOB in jobs
    match = f'ner_stream_model_info{{job="{JOB}"}}'
    instances = stack.api("label/instance/values", **{"match[]": match})
    assert instances == [stack.metrics_url.removeprefix("http://")]


@pytest.mark.parametrize("query", alert_queries(), ids=lambda q: q.where)
def test_alert_expression_evaluates(stack, query):
    # The expression parses and evaluates (`stack.query` asserts status "success"); its result is
    # legitimately empty on a healthy run, so only its inputs must have series.
    stack.query(query.expr)
    for name in sorted(metric_names(query.expr)):
        selector = f'{{__name__="{name}",job="{JOB}"}}'
        assert stack.query(f"count({selector})"), f"{query.where}: no series for {name}"


def test_prometheus_loads_every_alert_rule_healthy(stack):
    expected = {r["alert"] for r in alert_rules()}

    def evaluated() -> dict[str, dict]:
        rules = {r["name"]: r for g in stack.api("rules")["groups"] for r in g["rules"]}
        done = all(r.get("lastEvaluation", "").startswith("20") for r in rules.values())
        return rules if rules and done else {}

    rules = wait_for("every rule evaluated once", evaluated, timeout=30)
    assert set(rules) == expected
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    assert rules["NerStreamWorkerDown"]["state"] == "inactive"


def test_worker_down_alert_goes_pending_when_the_worker_stops(stack):
    # Last in this module: it stops the worker (gracefully: exit code 0).
    assert stop_process(stack.worker, timeout=30) == 0, tail(stack.worker_log)

    def pending() -> bool:
        rules = {r["name"]: r for g in stack.api("rules")["groups"] for r in g["rules"]}
        return rules["NerStreamWorkerDown"]["state"] in ("pending", "firing")

    wait_for("NerStreamWorkerDown to turn pending", pending, timeout=30)
    assert stack.scalar(f'up{{job="{JOB}"}}') == 0
