"""Helpers shared by the tests of the deployment files (tests/unit/test_deploy_files.py) and of a
real Prometheus (tests/integration/test_prometheus.py): the PromQL expressions of the Grafana
dashboard and of the alert rules, read from the files under deploy/, the metric names they use,
and the metric names `ner_stream.metrics.Metrics` defines."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "ner-stream.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
OPERATIONS_MD = REPO_ROOT / "docs" / "operations.md"

# The scrape job of deploy/prometheus/prometheus.yml and of the ServiceMonitor (the Service's name):
# the alert rules select job="ner-stream".
JOB = "ner-stream"

# Series that Prometheus itself makes for every target; the only names outside ner_stream_* that
# the dashboard and the alert rules may use.
PROMETHEUS_SERIES = frozenset({"up"})


@dataclass(frozen=True)
class Query:
    """One PromQL expression of the dashboard or of the alert rules, with where it comes from."""

    where: str  # "panel 'Documents/s' A" or "alert NerStreamWorkerDown"
    expr: str


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))  # panels inside (collapsed) rows
    return out


def dashboard_panels(dashboard: dict | None = None) -> list[dict]:
    """Every panel of the dashboard, rows included, nested panels flattened."""
    return _panels((dashboard or load_dashboard())["panels"])


def dashboard_queries(dashboard: dict | None = None) -> list[Query]:
    """The PromQL expression of every panel target, as written (with Grafana variables)."""
    out = []
    for p in dashboard_panels(dashboard):
        for t in p.get("targets", []):
            out.append(Query(f"panel {p['title']!r} {t['refId']}", t["expr"]))
    return out


def dashboard_variable_queries(dashboard: dict | None = None) -> list[Query]:
    """The `label_values(...)` queries of the dashboard's query variables."""
    out = []
    for v in (dashboard or load_dashboard())["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append(Query(f"variable ${v['name']}", q))
    return out


def alert_rules(rules_file: dict | None = None) -> list[dict]:
    """Every rule of deploy/prometheus/alerts.yml."""
    doc = rules_file or load_yaml(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_queries() -> list[Query]:
    return [Query(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]


# ---------------------------------------------------------------------------------- PromQL

_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
     "offset", "bool", "inf", "nan", "atan2"}
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects.

    A light lexer rather than a PromQL parser: string literals, label matchers, range and
    subquery brackets, grouping clauses and Grafana variables are removed, and what remains that
    looks like an identifier, is not followed by "(" (a function) and is not a keyword or a
    number's exponent is a metric name. `label_values(metric, label)` gives its metric.
    """
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.S)
    if m:
        expr = m.group(1)
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    text = _VARIABLE.sub("", text)
    names = set(_IDENT.findall(text))
    return {n for n in names if n.lower() not in _KEYWORDS}


def defined_metric_names() -> set[str]:
    """The sample names `ner_stream.metrics.Metrics` can expose, from its own registry.

    Families are read from the registry (`describe()` would do, but `collect()` is public on
    every prometheus_client release); a family's type gives its sample names: `_total` for a
    counter, `_bucket`/`_sum`/`_count` for a histogram, `_info` for an info metric.
    """
    from ner_stream.metrics import Metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names = set()
    for family in Metrics().registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def defined_metric_families() -> dict[str, str]:
    """Family name -> type, for every metric `Metrics` defines."""
    from ner_stream.metrics import Metrics

    return {f.name: f.type for f in Metrics().registry.collect()}


def grafana_to_promql(expr: str, rate_interval: str = "1m", job: str = JOB) -> str:
    """A dashboard expression as Grafana would send it: the variables replaced.

    `$__rate_interval`/`$__interval`/`$__range` become `rate_interval`; `$job` becomes `job`;
    any other variable (`$instance`) becomes `.*`, its "All" value (the dashboard only uses
    variables inside `=~` matchers).
    """
    out = expr
    for builtin in ("$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}",
                    "$__range", "${__range}"):  # fmt: skip
        out = out.replace(builtin, rate_interval)
    out = re.sub(r"\$\{?job\}?", job, out)
    return re.sub(r"\$\{?\w+\}?", ".*", out)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[`*~]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def markdown_anchors(path: Path = OPERATIONS_MD) -> set[str]:
    """Anchors of every heading of a Markdown file (outside fenced code blocks)."""
    anchors, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*)", line)
        if m:
            anchors.add(github_anchor(m.group(1)))
    return anchors
