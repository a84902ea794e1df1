"""The soak's arithmetic and report (benchmarks/soak.py), on made-up samples: no broker, no
worker. What a reader of the report relies on: the RSS slope is the least-squares slope after the
warm-up, the p99 at the start and the end are over the documents of the edge windows, and the
charts show a drift."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import soak


def args(**overrides) -> argparse.Namespace:
    values = soak.parse_args(["--minutes", "2", "--rate", "10", "--out", "/tmp/x"])
    for key, value in overrides.items():
        setattr(values, key, value)
    return values


def test_the_rss_slope_is_per_hour_and_ignores_noise_around_a_line():
    # 10 MiB per hour = 1/360 MiB per second, with alternating noise of +-0.5 MiB.
    points = [
        (t, 500 + t / 360 + (0.5 if i % 2 else -0.5)) for i, t in enumerate(range(0, 1800, 10))
    ]
    assert soak.slope_per_hour(points) == pytest.approx(10, abs=0.5)
    assert soak.slope_per_hour([(0, 1), (10, 2)]) is None  # too few to say
    assert soak.slope_per_hour([(5, 1), (5, 2), (5, 3)]) is None


def test_the_summary_leaves_the_warm_up_out_of_the_slope_and_takes_the_edges_for_p99():
    # Memory that jumps in the first minute (warm-up) and is flat after: a slope of 0.
    samples = [
        {"t_s": t, "rss_mib": 300.0 if t < 60 else 600.0, "p99_s": 0.1, "latency_missing": 0,
         "series": 80 + (t >= 300), "queue_depth": 0}
        for t in range(10, 601, 10)
    ]  # fmt: skip
    windows = [[0.01] * 299 + [1.0]] + [[0.02] * 100] * 57 + [[0.05] * 100]
    summary = soak.summarize(samples, windows, args(warmup_minutes=2, edge_windows=1))
    assert summary["rss_slope_mib_per_hour"] == pytest.approx(0)
    assert summary["rss_slope_samples"] == 49
    assert summary["p99_s_start"] == 0.01 and summary["p99_s_end"] == 0.05
    assert (summary["series_start"], summary["series_end"]) == (80, 81)
    wide = soak.summarize(samples, windows, args(edge_windows=3))
    assert wide["p99_s_start"] == 0.02  # the outlier is 1 of 500 documents


def test_series_are_the_sample_lines_of_the_page():
    page = '# HELP a x\n# TYPE a counter\na_total 1\nb{l="1"} 2\nb{l="2"} 3\n\n'
    assert soak.series_count(page) == 3


def test_latency_is_the_append_time_minus_the_scheduled_time_and_missing_ones_are_counted():
    scheduled = {b"a": 100.0, b"b": 100.5, b"c": 101.0}
    lat, missing = soak.latencies(scheduled, {b"a": 100_250, b"b": 100_600})
    assert lat == pytest.approx([0.1, 0.25]) and missing == 1


def test_the_chart_shows_a_drift_and_keeps_to_its_rows():
    points = [(t * 10.0, 500 + t) for t in range(100)]
    chart = soak.text_chart(points, "MiB", width=40, rows=20).splitlines()
    assert chart[0].strip() == "500.0 .. 599.0 MiB"
    bars = [line.split("│")[1] for line in chart[1:]]
    assert len(bars) <= 21
    assert bars[0].count("█") == 1 and bars[-1].count("█") == 40
    assert [b.count("█") for b in bars] == sorted(b.count("█") for b in bars)
    assert soak.text_chart([(0.0, None)], "ms") == "(no data)"


def test_the_report_renders_every_chart_and_the_summary():
    samples = [
        {"t_s": t, "rss_mib": 500.0 + t / 100, "p99_s": 0.03, "p50_s": 0.01, "latency_docs": 10,
         "latency_missing": 0, "series": 90, "queue_depth": 1}
        for t in range(10, 121, 10)
    ]  # fmt: skip
    a = args(warmup_minutes=0.5)
    result = {
        "settings": {"minutes": 2},
        "rate_docs_per_s": 10.0,
        "rate_source": "--rate",
        "host": {"time_utc": "2030-01-01T00:00:00Z", "load_average": [0.1, 0.1, 0.1]},
        "soak": {"samples": samples,
                 "worker": {"exit_code": 0, "shutdown_s": 1.0, "peak_rss_bytes": 600 * soak.MIB}},
        "summary": soak.summarize(samples, [[0.03] * 10] * 12, a),
    }  # fmt: skip
    text = soak.report(result, a)
    for title in ("Resident memory", "p99 latency", "Queue depth", "Metric series"):
        assert f"## {title}" in text
    assert "RSS slope: +36.0 MiB/hour" in text
    assert "metric series: start 90, end 90" in text
