"""The deployment files under deploy/: they parse, promtool accepts the Prometheus files, the alert
expressions mean what they say (promtool rule tests on synthetic series), and the dashboard, the
alert rules, compose, the Kubernetes manifests and the Dockerfiles agree with the code (metric
names from `ner_stream.metrics`, settings from `ner_stream.config`) and with each other.

A real Prometheus scraping a real worker is tests/integration/test_prometheus.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ner_stream.config import SETTINGS
from tests.deploy_util import (
    ALERTS,
    DEPLOY,
    JOB,
    OPERATIONS_MD,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SERIES,
    REPO_ROOT,
    alert_queries,
    alert_rules,
    dashboard_panels,
    dashboard_queries,
    dashboard_variable_queries,
    defined_metric_families,
    defined_metric_names,
    load_dashboard,
    load_yaml,
    markdown_anchors,
    metric_names,
)

K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
SETTING_ENVVARS = {s.envvar for s in SETTINGS}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH: run `make prometheus` "
    "(deploy/prometheus/ensure-prometheus.sh)",
)


def deploy_files(*suffixes: str) -> list[Path]:
    """Files under deploy/ with one of the suffixes, skipping hidden (git-ignored) folders such as
    deploy/kafka/.cache and .state."""
    return sorted(
        p
        for p in DEPLOY.rglob("*")
        if p.is_file()
        and p.suffix in suffixes
        and not any(part.startswith(".") for part in p.relative_to(DEPLOY).parts)
    )


def k8s_documents() -> dict[str, dict]:
    """Every Kubernetes object of deploy/k8s, keyed by "Kind/name"."""
    docs = {}
    for path in deploy_files(".yaml"):
        if path.parent != K8S or path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


# ------------------------------------------------------------------------------ every file parses


@pytest.mark.parametrize(
    "path", deploy_files(".yml", ".yaml"), ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_yaml_file_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", deploy_files(".json"), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_file_parses(path):
    assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict)


def test_the_expected_files_exist():
    expected = [
        "docker/Dockerfile",
        "docker/Dockerfile.cpu",
        "compose.yaml",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "prometheus/ensure-prometheus.sh",
        "grafana/ner-stream.json",
        "grafana/provisioning/datasources/prometheus.yaml",
        "grafana/provisioning/dashboards/ner-stream.yaml",
    ]
    missing = [p for p in expected if not (DEPLOY / p).is_file()]
    assert not missing
    assert (REPO_ROOT / ".dockerignore").is_file()
    assert os.access(DEPLOY / "prometheus" / "ensure-prometheus.sh", os.X_OK)


def test_ensure_prometheus_script_is_valid_bash():
    result = subprocess.run(
        ["bash", "-n", str(DEPLOY / "prometheus" / "ensure-prometheus.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------ promtool


@needs_promtool
def test_promtool_check_rules():
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_config():
    # Checks prometheus.yml and the rule files it names (relative to it: alerts.yml).
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def expr_of(alert: str) -> str:
    (rule,) = [r for r in alert_rules() if r["alert"] == alert]
    return rule["expr"]


W1 = {"job": JOB, "instance": "w1:9400"}


def series(name: str, values: str, **labels: str) -> dict:
    sel = ",".join(f'{k}="{v}"' for k, v in {**W1, **labels}.items())
    return {"series": f"{name}{{{sel}}}", "values": values}


# Each case: synthetic series (one sample a minute), then the alert's expression evaluated at a
# time with the samples it must return ([] = the alert condition does not hold). The expressions
# are read from alerts.yml, so these check the rules as deployed.
RULE_CASES = {
    "worker down": (
        [series("up", "1 1 0 0 0")],
        [("NerStreamWorkerDown", "1m", []),
         ("NerStreamWorkerDown", "3m", [({"__name__": "up", **W1}, 0)])],
    ),
    "no progress while lag waits": (
        [series("ner_stream_consumer_lag", "500x20", topic="documents", partition="0"),
         series("ner_stream_consumer_lag", "0x20", topic="documents", partition="1"),
         series("ner_stream_documents_total", "100x20", outcome="ok")],
        [("NerStreamNoProgress", "20m", [({"topic": "documents"}, 500)])],
    ),
    "lag with progress is not 'no progress'": (
        [series("ner_stream_consumer_lag", "500x20", topic="documents", partition="0"),
         series("ner_stream_documents_total", "0+10x20", outcome="ok")],
        [("NerStreamNoProgress", "20m", [])],
    ),
    "lag growing": (
        [series("ner_stream_consumer_lag", "0+200x30", topic="documents", partition="0"),
         series("ner_stream_consumer_lag", "0+100x30", topic="documents", partition="1")],
        [("NerStreamConsumerLagGrowing", "30m", [({"topic": "documents"}, 9000)]),
         ("NerStreamConsumerLagGrowing", "3m", [])],  # 900 records: under the floor
    ),
    "high but shrinking lag is fine": (
        [series("ner_stream_consumer_lag", "20000-100x30", topic="documents", partition="0")],
        [("NerStreamConsumerLagGrowing", "30m", [])],
    ),
    "dead-letter share per reason": (
        # 9 documents/s ok, 1/s dead-lettered as invalid_json, 0.01/s as too_large.
        [series("ner_stream_documents_total", "0+540x20", outcome="ok"),
         series("ner_stream_documents_total", "0+61x20", outcome="dead_letter"),
         series("ner_stream_dead_letters_total", "0+60x20", reason="invalid_json"),
         series("ner_stream_dead_letters_total", "0+1x20", reason="too_large")],
        [("NerStreamDeadLetterRateHigh", "20m", [({"reason": "invalid_json"}, 60 / 601)])],
    ),
    "commits failing with none succeeding": (
        [series("ner_stream_commits_total", "0+5x20", result="failed"),
         series("ner_stream_commits_total", "30x20", result="ok"),
         series("ner_stream_commits_total", "0+5x20", result="failed", instance="w2:9400"),
         series("ner_stream_commits_total", "0+60x20", result="ok", instance="w2:9400")],
        [("NerStreamCommitsFailing", "20m", [({"instance": "w1:9400"}, 50)])],
    ),
    "backpressure": (
        [series("ner_stream_paused_partitions", "2x20")],
        [("NerStreamBackpressure", "20m", [({"instance": "w1:9400"}, 2)])],
    ),
    "model process restarting": (
        # w1: 3 restarts in 30 minutes; w2: 2 (under the threshold).
        [series("ner_stream_model_restarts_total", "0 0 1 1 2 2 3 3 3 3"),
         series("ner_stream_model_restarts_total", "0 0 1 1 2 2 2 2 2 2", instance="w2:9400")],
        [("NerStreamModelRestarting", "9m", [({"instance": "w1:9400"}, 3)]),
         ("NerStreamModelRestarting", "1m", [])],
    ),
}  # fmt: skip


@needs_promtool
@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_alert_expression_semantics(tmp_path, case):
    input_series, evaluations = RULE_CASES[case]
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "promql_expr_test": [
                    {
                        "expr": expr_of(alert),
                        "eval_time": at,
                        "exp_samples": [
                            {
                                "labels": "{"
                                + ",".join(f'{k}="{v}"' for k, v in labels.items())
                                + "}",
                                "value": value,
                            }
                            for labels, value in samples
                        ],
                    }
                    for alert, at, samples in evaluations
                ],
            }
        ],
    }
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    result = run_promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------ alert rules


def test_alert_rules_are_complete():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for expected in ("NerStreamWorkerDown", "NerStreamNoProgress", "NerStreamConsumerLagGrowing",
                     "NerStreamDeadLetterRateHigh"):  # fmt: skip
        assert expected in names
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"].get("summary"), r["alert"]
        assert r["annotations"].get("description"), r["alert"]
        assert f'job="{JOB}"' in r["expr"], f"{r['alert']} must select the ner-stream job"


def test_every_alert_has_a_runbook_section():
    anchors = markdown_anchors()
    for r in alert_rules():
        runbook = r["annotations"].get("runbook", "")
        path, _, anchor = runbook.partition("#")
        assert path == "docs/operations.md", f"{r['alert']}: runbook {runbook!r}"
        assert anchor in anchors, f"{r['alert']}: no heading for #{anchor} in {OPERATIONS_MD}"


def test_prometheusrule_matches_alerts_file():
    """deploy/k8s/prometheusrule.yaml carries the same groups as deploy/prometheus/alerts.yml."""
    rule = k8s_documents()["PrometheusRule/ner-stream"]
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"], (
        "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: copy the "
        "groups of alerts.yml under spec"
    )


# ------------------------------------------------------------------------------ metric names


def test_metric_names_are_read_from_the_registry():
    names = defined_metric_names()
    # A sample of each kind, so that a broken name collection cannot pass the tests below vacuously.
    for name in ("ner_stream_documents_total", "ner_stream_end_to_end_seconds_bucket",
                 "ner_stream_consumer_lag", "ner_stream_model_info"):  # fmt: skip
        assert name in names


@pytest.mark.parametrize(
    "query",
    dashboard_queries() + dashboard_variable_queries() + alert_queries(),
    ids=lambda q: q.where,
)
def test_queries_only_use_defined_metrics(query):
    used = metric_names(query.expr)
    assert used, f"no metric found in {query.expr!r}"
    unknown = used - defined_metric_names() - PROMETHEUS_SERIES
    assert not unknown, (
        f"{query.where} uses {sorted(unknown)}, which ner_stream/metrics.py does not define"
    )


def test_dashboard_shows_every_metric():
    """Every ner_stream_ metric family has a panel: a new metric needs one too.

    (The process_* and python_* families of the standard collectors are optional.)
    """
    used = set()
    for q in dashboard_queries():
        used |= metric_names(q.expr)
    suffixes = {"counter": "_total", "info": "_info", "histogram": "_bucket"}
    missing = []
    for family, kind in defined_metric_families().items():
        if not family.startswith("ner_stream_"):
            continue
        if kind == "histogram":
            if not any(n.startswith(family + "_") for n in used):
                missing.append(family)
        elif family + suffixes.get(kind, "") not in used:
            missing.append(family)
    assert not missing, f"metrics without a dashboard panel: {missing}"


# ------------------------------------------------------------------------------ dashboard


def test_dashboard_structure():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "ner-stream"
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p.get("description"), f"panel {p['title']!r} needs a description"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            # Variables only inside regex matchers, where their "All" value (.*) fits.
            for m in re.finditer(r'(\w+)\s*(=~|!~|=|!=)\s*"([^"]*\$[^"]*)"', t["expr"]):
                assert m.group(2) == "=~", f"{p['title']}: use =~ with a variable: {m.group(0)}"


def test_dashboard_covers_the_required_views():
    text = " ".join(q.expr for q in dashboard_queries())
    for needle in (
        "rate(ner_stream_documents_total",
        "rate(ner_stream_tokens_total",
        "histogram_quantile(0.5, sum by (le) (rate(ner_stream_end_to_end_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(ner_stream_end_to_end_seconds_bucket",
        "ner_stream_stage_seconds_bucket",
        "max by (topic, partition) (ner_stream_consumer_lag",
        "ner_stream_batch_documents",
        "ner_stream_batch_tokens",
        "ner_stream_padding_ratio",
        "sum by (reason) (rate(ner_stream_dead_letters_total",
        "ner_stream_paused_partitions",
        "ner_stream_queue_depth",
        "ner_stream_model_info",
    ):
        assert needle in text, needle


# ------------------------------------------------------------------------------ compose


def test_compose_file_is_consistent():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"kafka", "worker", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == REPO_ROOT, name
            assert (context / build["dockerfile"]).is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} is missing"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish on 127.0.0.1 only"
    worker = services["worker"]
    assert worker["command"][:2] == ["run", "--create-topics"]
    env = worker["environment"]
    unknown = {k for k in env if k.startswith("NER_STREAM_")} - SETTING_ENVVARS
    assert not unknown, f"compose sets unknown settings {unknown}"
    assert env["NER_STREAM_METRICS_HOST"] == "0.0.0.0"
    # Prometheus scrapes the worker's metrics port, under the job the alert rules select.
    scrape = {j["job_name"]: j for j in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    (sd,) = scrape[JOB]["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["port"] == int(env["NER_STREAM_METRICS_PORT"])
    # Grafana's dashboard provider reads the folder the dashboard is mounted into.
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/ner-stream.yaml")
    folder = provider["providers"][0]["options"]["path"]
    mounts = [v.split(":")[1] for v in services["grafana"]["volumes"]]
    assert f"{folder}/ner-stream.json" in mounts
    grace = int(worker["stop_grace_period"].rstrip("s"))
    assert grace > _default("shutdown_timeout_s")


def _default(name: str):
    return next(s.default for s in SETTINGS if s.name == name)


# ------------------------------------------------------------------------------ Kubernetes


def test_kustomization_lists_existing_files():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]


def test_kubernetes_objects_are_present():
    docs = k8s_documents()
    for key in ("ConfigMap/ner-stream", "Secret/ner-stream-kafka", "Deployment/ner-stream",
                "Service/ner-stream", "ServiceMonitor/ner-stream", "PodDisruptionBudget/ner-stream",
                "ScaledObject/ner-stream", "TriggerAuthentication/ner-stream-kafka",
                "PrometheusRule/ner-stream"):  # fmt: skip
        assert key in docs, key


def test_deployment_matches_the_worker():
    docs = k8s_documents()
    config = docs["ConfigMap/ner-stream"]["data"]
    secret = docs["Secret/ner-stream-kafka"]["stringData"]
    deployment = docs["Deployment/ner-stream"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    unknown = (set(config) | {e["name"] for e in container["env"]}) - SETTING_ENVVARS - {"HOME"}
    assert not unknown, f"unknown settings: {unknown}"
    assert config["NER_STREAM_METRICS_HOST"] == "0.0.0.0"
    assert "NER_STREAM_SASL_PASSWORD" not in config, "the password belongs in the Secret"
    for e in container["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == "ner-stream-kafka" and ref["key"] in secret, e["name"]

    assert pod["terminationGracePeriodSeconds"] > float(config["NER_STREAM_SHUTDOWN_TIMEOUT_S"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    (port,) = container["ports"]
    assert port["containerPort"] == int(config["NER_STREAM_METRICS_PORT"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"

    service = docs["Service/ner-stream"]
    monitor = docs["ServiceMonitor/ner-stream"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], docs["PodDisruptionBudget/ner-stream"]["spec"]
                     ["selector"]["matchLabels"]):  # fmt: skip
        assert selector.items() <= labels.items()
    service_labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    # The ServiceMonitor's job label is the Service's name: the job the alert rules select.
    assert service["metadata"]["name"] == JOB


def test_scaledobject_is_bounded_by_the_partitions():
    docs = k8s_documents()
    config = docs["ConfigMap/ner-stream"]["data"]
    scaled = docs["ScaledObject/ner-stream"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "ner-stream"
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["maxReplicaCount"] <= int(config["NER_STREAM_TOPIC_PARTITIONS"])
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["topic"] == config["NER_STREAM_INPUT_TOPIC"]
    assert meta["consumerGroup"] == config["NER_STREAM_GROUP_ID"]
    assert meta["bootstrapServers"] == config["NER_STREAM_BOOTSTRAP_SERVERS"]
    assert meta.get("allowIdleConsumers", "false") == "false"
    auth = docs[f"TriggerAuthentication/{trigger['authenticationRef']['name']}"]
    secret = docs["Secret/ner-stream-kafka"]["stringData"]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == "ner-stream-kafka" and ref["key"] in secret, ref


# ------------------------------------------------------------------------------ Dockerfiles


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile(name):
    text = (DEPLOY / "docker" / name).read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["ner-stream"]' in text
    assert 'CMD ["run"]' in text
    assert re.search(r"^EXPOSE 9400$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert re.search(r"^USER 10001", text, re.M), "the image must run as a non-root user"
    for var in re.findall(r"\b(NER_STREAM_\w+)=", text):
        assert var in SETTING_ENVVARS, var
    if name == "Dockerfile":
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:", text, re.M)
    else:
        assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
        assert "download.pytorch.org/whl/cpu" in text


def test_dockerignore_keeps_what_the_build_copies():
    lines = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for needed in ("!pyproject.toml", "!README.md", "!ner_stream/", "!training/"):
        assert needed in lines


def test_operations_md_links_resolve():
    text = OPERATIONS_MD.read_text(encoding="utf-8")
    anchors = markdown_anchors()
    broken = [a for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in anchors]
    assert not broken, f"docs/operations.md links to missing sections: {broken}"
    assert "workers = ceil(peak tokens/s / tokens/s per worker / 0.7)" in text


def test_capacity_figure_is_the_one_benchmarked():
    """The per-worker rate in the capacity rule is the end-to-end figure of the last make bench."""
    summary = json.loads((REPO_ROOT / "benchmarks/results/summary.json").read_text())
    measured = round(summary["figures"]["e2e_tokens_per_s"])
    text = OPERATIONS_MD.read_text(encoding="utf-8")
    assert f"{measured:,} tokens/s" in text
