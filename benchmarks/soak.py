"""Soak: one `ner-stream run` worker for a long time at half its saturating rate, watched for
what only time shows: memory that grows, latency that creeps up, a queue that never empties, and
metric series that multiply.

1. The rate. `--rate` documents/s, or `--rate-fraction` (0.5) of the saturating rate measured
   first with bench_e2e's saturation run (`--saturation-docs` documents, a worker of its own).
2. The soak. A fresh worker on fresh topics; documents offered open-loop (bench_e2e.open_loop:
   each at its scheduled time, whatever the worker does) in windows of `--sample-seconds` (10),
   for `--minutes` (30). After each window, a sample: the resident memory of the worker and its
   model process (VmRSS, summed), the p99 latency of the documents of the window before (a
   window's documents get the next window to arrive), `ner_stream_queue_depth` and the number
   of metric series (sample lines) of its /metrics. Latency = the output's broker append time
   (LogAppendTime) - the input's scheduled send time, as in bench_e2e.
3. The report. `<out>.json` (every sample) and `<out>.md` (a summary and text charts); printed:
   the RSS slope in MiB/hour (least squares over the samples after `--warmup-minutes`, 2), p99
   at the start and the end (each over the first or last `--edge-windows` windows, 3), and the
   metric series count at the start and the end.

Needs a broker (`make kafka-up`; `make soak` starts and stops one when none runs). Not part of
CI: it runs for half an hour on an otherwise quiet machine.

    python -m benchmarks.soak [--minutes 30] [--rate DOCS_PER_S] [--model M.nerm]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from kafka import KafkaAdminClient, KafkaProducer

from benchmarks.bench_e2e import (
    OutputReader,
    Worker,
    descendants,
    local_bootstrap,
    make_topics,
    open_loop,
    parse_metrics,
    proc_status_bytes,
    saturation,
)
from benchmarks.common import RESULTS, display_path, host_info, log, percentile, write_json
from benchmarks.corpus import DEFAULT_SEED, documents
from ner_stream.config import WorkerConfig

MIB = 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Soak one worker at half its saturating rate.")
    p.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("NER_STREAM_BOOTSTRAP_SERVERS", local_bootstrap()),
        help="default: NER_STREAM_BOOTSTRAP_SERVERS, else the local broker (KAFKA_PORT, 9092)",
    )
    p.add_argument("--model", default=os.environ.get("BENCH_MODEL"), help="model file")
    p.add_argument("--minutes", type=float, default=30.0, help="length of the soak (30)")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="offered documents/s (default: "
        "--rate-fraction of the saturating rate, measured first)",
    )
    p.add_argument("--rate-fraction", type=float, default=0.5)
    p.add_argument("--saturation-docs", type=int, default=10_000)
    p.add_argument("--saturation-timeout-s", type=float, default=300.0)
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument(
        "--warmup-minutes",
        type=float,
        default=2.0,
        help="samples before this are left out of the RSS slope (2)",
    )
    p.add_argument(
        "--edge-windows",
        type=int,
        default=3,
        help="windows that make the p99 at the start and at the end (3)",
    )
    p.add_argument("--drain-timeout-s", type=float, default=60.0)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--max-wait-ms", type=int, default=WorkerConfig().max_wait_ms)
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "0")))
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="extra argument for `ner-stream run` (repeatable)",
    )
    p.add_argument("--keep-topics", action="store_true")
    p.add_argument(
        "--out",
        default=str(RESULTS / "soak"),
        help="writes <out>.json and <out>.md (default benchmarks/results/soak)",
    )
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.sample_seconds <= 0:
        p.error("--minutes and --sample-seconds must be positive")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")
    return args


# ------------------------------------------------------------------------------------ measuring


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process now (VmRSS, Linux), None when unknown."""
    return proc_status_bytes(pid, "VmRSS")


def tree_rss_bytes(pid: int) -> int | None:
    """RSS of a worker and its model process, summed (shared library pages count twice)."""
    known = [r for r in (rss_bytes(p) for p in (pid, *descendants(pid))) if r is not None]
    return sum(known) if known else None


def series_count(metrics_text: str) -> int:
    """Metric series in a Prometheus text page: its sample lines."""
    return sum(1 for line in metrics_text.splitlines() if line and not line.startswith("#"))


def latencies(scheduled: dict[bytes, float], times: dict[bytes, int]) -> tuple[list[float], int]:
    """Sorted latencies (s) of the scheduled documents whose output was read, and how many were
    not (yet)."""
    lat = sorted(times[k] / 1000 - due for k, due in scheduled.items() if k in times)
    return lat, len(scheduled) - len(lat)


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour; None under 3 points or when
    all points share one time."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 3600


def text_chart(
    points: list[tuple[float, float | None]], unit: str, width: int = 50, rows: int = 30
) -> str:
    """Horizontal bars, one per row of time (at most `rows`, evenly picked), scaled from the
    smallest value to the largest so that a drift shows; missing values are left blank."""
    known = [v for _, v in points if v is not None]
    if not known:
        return "(no data)"
    step = max(1, -(-len(points) // rows))
    picked = points[::step]
    if picked[-1] is not points[-1]:
        picked.append(points[-1])
    low, high = min(known), max(known)
    span = high - low
    lines = [f"{'':>8}  {low:.1f} .. {high:.1f} {unit}"]
    for t, v in picked:
        if v is None:
            lines.append(f"{t / 60:>6.1f} m │")
            continue
        filled = width if span == 0 else round((v - low) / span * width)
        lines.append(f"{t / 60:>6.1f} m │{'█' * max(1, filled):<{width}} {v:.1f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the soak


def soak(
    args: argparse.Namespace, admin: KafkaAdminClient, prefix: str, docs: list[dict], rate: float
) -> dict:
    """Run the soak (step 2 of the module docstring); returns the samples and the worker's
    stop report."""
    topics = make_topics(admin, f"{prefix}-soak", args.partitions)
    reader = OutputReader(args.bootstrap_servers, topics[1], args.partitions).start()
    worker = Worker(args, "soak", topics)
    producer = KafkaProducer(bootstrap_servers=args.bootstrap_servers, acks=1, linger_ms=5)
    windows = max(1, round(args.minutes * 60 / args.sample_seconds))
    samples: list[dict] = []
    window_latencies: list[list[float]] = []  # for the p99 at the start and the end
    previous: dict[bytes, float] = {}
    try:
        ready_s = worker.wait_ready(120)
        log(
            f"soak: {rate:.1f} docs/s for {args.minutes:g} min, a sample every "
            f"{args.sample_seconds:g} s"
        )
        t0 = time.time()
        for k in range(windows):
            started = time.time()
            scheduled, lateness = open_loop(
                producer, topics[0], docs, f"w{k}", rate, args.sample_seconds
            )
            worker.check()
            samples.append(sample(worker, reader, t0, previous, k - 1, window_latencies))
            samples[-1]["offered_docs_per_s"] = len(scheduled) / (time.time() - started)
            samples[-1]["producer_lateness_max_s"] = max(lateness, default=None)
            previous = scheduled
            if k % 6 == 5:
                s = samples[-1]
                log(
                    f"  {s['t_s'] / 60:.1f} min: RSS {fmt(s['rss_mib'], '.0f')} MiB, p99 "
                    f"{fmt_ms(s['p99_s'])}, queue {s['queue_depth']}, {s['series']} series"
                )
        # The last window's documents: given the time the others had, at most the drain time.
        deadline = time.time() + args.drain_timeout_s
        while time.time() < deadline and not all(k in reader.snapshot()[1] for k in previous):
            worker.check()
            time.sleep(0.5)
        samples.append(sample(worker, reader, t0, previous, windows - 1, window_latencies))
    finally:
        producer.close()
        stopped = worker.stop()
        reader.close()
    return {
        "topics": list(topics),
        "worker_ready_s": ready_s,
        "samples": samples,
        "worker": stopped,
        "latencies": window_latencies,
    }


def sample(
    worker: Worker,
    reader: OutputReader,
    t0: float,
    scheduled: dict[bytes, float],
    window: int,
    window_latencies: list[list[float]],
) -> dict:
    """One sample of the worker now, with the latency of `scheduled` (window number `window`),
    whose sorted latencies are appended to `window_latencies` as well."""
    _, body = worker.get("/metrics")
    metrics = parse_metrics(body)
    lat, missing = latencies(scheduled, reader.take(scheduled))
    if scheduled:
        window_latencies.append(lat)
    rss = tree_rss_bytes(worker.proc.pid)
    queue = metrics.get("ner_stream_queue_depth")
    return {
        "t_s": round(time.time() - t0, 3),
        "rss_bytes": rss,
        "rss_mib": rss / MIB if rss else None,
        "scraped_rss_bytes": metrics.get("process_resident_memory_bytes"),
        "latency_window": window if scheduled else None,
        "latency_docs": len(lat),
        "latency_missing": missing,
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "queue_depth": int(queue) if queue is not None else None,
        "series": series_count(body) if body else None,
    }


def summarize(
    samples: list[dict], window_latencies: list[list[float]], args: argparse.Namespace
) -> dict:
    """The figures printed at the end (step 3 of the module docstring); `window_latencies` are
    the sorted latencies of each window, in order."""
    warm = args.warmup_minutes * 60
    rss_points = [
        (s["t_s"], s["rss_mib"]) for s in samples if s["t_s"] >= warm and s["rss_mib"] is not None
    ]
    edge = args.edge_windows
    timed = [w for w in window_latencies if w]
    series = [s["series"] for s in samples if s["series"] is not None]
    rss = [s["rss_mib"] for s in samples if s["rss_mib"] is not None]
    queue = [s["queue_depth"] for s in samples if s["queue_depth"] is not None]
    return {
        "rss_slope_mib_per_hour": slope_per_hour(rss_points),
        "rss_slope_samples": len(rss_points),
        "rss_mib_start": rss[0] if rss else None,
        "rss_mib_end": rss[-1] if rss else None,
        "rss_mib_max": max(rss) if rss else None,
        "p99_s_start": percentile(sorted(x for w in timed[:edge] for x in w), 99),
        "p99_s_end": percentile(sorted(x for w in timed[-edge:] for x in w), 99),
        "p99_s_max": max((s["p99_s"] for s in samples if s["p99_s"] is not None), default=None),
        "latency_missing": sum(s["latency_missing"] for s in samples),
        "series_start": series[0] if series else None,
        "series_end": series[-1] if series else None,
        "queue_depth_max": max(queue) if queue else None,
        "queue_depth_end": queue[-1] if queue else None,
    }


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary_lines(summary: dict, args: argparse.Namespace) -> list[str]:
    """The summary as the lines printed at the end and put at the top of the report."""
    return [
        f"RSS slope: {fmt(summary['rss_slope_mib_per_hour'], '+.1f')} MiB/hour (least squares "
        f"over {summary['rss_slope_samples']} samples after {args.warmup_minutes:g} min; RSS "
        f"{fmt(summary['rss_mib_start'], '.0f')} -> {fmt(summary['rss_mib_end'], '.0f')} MiB, "
        f"max {fmt(summary['rss_mib_max'], '.0f')})",
        f"p99 latency: start {fmt_ms(summary['p99_s_start'])}, end "
        f"{fmt_ms(summary['p99_s_end'])} (over the documents of the first / last "
        f"{args.edge_windows} windows), largest window p99 {fmt_ms(summary['p99_s_max'])}; "
        f"{summary['latency_missing']} documents without an output when sampled",
        f"metric series: start {summary['series_start']}, end {summary['series_end']}",
        f"queue depth: max {summary['queue_depth_max']}, end {summary['queue_depth_end']}",
    ]


def report(result: dict, args: argparse.Namespace) -> str:
    """The Markdown report: settings, the summary, and a text chart of each watched figure."""
    samples = result["soak"]["samples"]
    summary = result["summary"]
    charts = (
        ("Resident memory of the worker and its model process", "MiB", "rss_mib", 1.0),
        ("p99 latency of each window", "ms", "p99_s", 1000.0),
        ("Queue depth (ner_stream_queue_depth)", "documents", "queue_depth", 1.0),
        ("Metric series on /metrics", "series", "series", 1.0),
    )
    out = [
        "# Soak",
        "",
        f"{result['settings']['minutes']:g} minutes at {result['rate_docs_per_s']:.1f} documents/s "
        f"({result['rate_source']}), a sample every {args.sample_seconds:g} s; "
        f"{result['host']['time_utc']}, load average before {result['host']['load_average']}. "
        f"Written by `python -m benchmarks.soak`; the samples are in "
        f"`{display_path(Path(args.out + '.json'))}`.",
        "",
        "```",
        *summary_lines(summary, args),
        "```",
    ]
    for title, unit, key, scale in charts:
        points = [(s["t_s"], None if s[key] is None else s[key] * scale) for s in samples]
        out += ["", f"## {title}", "", "```", text_chart(points, unit), "```"]
    worker = result["soak"]["worker"]
    out += [
        "",
        f"Worker: exit code {worker['exit_code']}, shutdown {worker['shutdown_s']:.1f} s, "
        f"peak RSS (worker + model process) {fmt((worker['peak_rss_bytes'] or 0) / MIB, '.0f')}"
        " MiB.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import kafka
    import torch

    prefix = f"soak-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap_servers, request_timeout_ms=30_000)
    docs = documents(args.saturation_docs, args.seed)
    result: dict = {
        "benchmark": "soak",
        "host": host_info(measure_busy=True),
        "versions": {"torch": torch.__version__, "kafka_python": kafka.__version__},
        "settings": {
            "minutes": args.minutes,
            "sample_seconds": args.sample_seconds,
            "warmup_minutes": args.warmup_minutes,
            "edge_windows": args.edge_windows,
            "partitions": args.partitions,
            "seed": args.seed,
            "max_wait_ms": args.max_wait_ms,
            "worker_args": args.worker_arg,
            "model": display_path(args.model) if args.model else "packaged",
        },
    }
    try:
        if args.rate is not None:
            rate, result["rate_source"] = args.rate, "--rate"
        else:
            sat = saturation(args, admin, prefix, docs)
            result["saturation"] = sat
            if not sat["docs_per_s"]:
                raise RuntimeError("the saturation run produced no throughput figure")
            rate = args.rate_fraction * sat["docs_per_s"]
            result["rate_source"] = (
                f"{args.rate_fraction:g} of the saturating {sat['docs_per_s']:.1f} docs/s"
            )
        result["rate_docs_per_s"] = rate
        result["soak"] = soak(args, admin, prefix, docs, rate)
    finally:
        if not args.keep_topics:
            try:
                names = [t for t in admin.list_topics() if t.startswith(prefix)]
                if names:
                    admin.delete_topics(names)
            except Exception as e:  # noqa: BLE001 - cleanup must not hide the result
                log(f"could not delete the soak topics: {e}")
        admin.close()
    window_latencies = result["soak"].pop("latencies")
    result["summary"] = summarize(result["soak"]["samples"], window_latencies, args)
    result["host"]["load_average_after"] = host_info()["load_average"]
    write_json(args.out + ".json", result)
    md = Path(args.out + ".md")
    md.write_text(report(result, args), encoding="utf-8")
    print(f"wrote {display_path(md)}", file=sys.stderr)
    print("\n".join(summary_lines(result["summary"], args)))
    return 0 if result["soak"]["worker"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
