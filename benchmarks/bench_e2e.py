"""(b) End to end through a real broker: one `ner-stream run` worker, documents in, entities out.

1. Saturation. The corpus (default 50,000 documents) is produced to a fresh input topic
   beforehand; then one worker (a subprocess, fresh consumer group) drains it. Throughput is
   taken from the output topic, which is created with `message.timestamp.type=LogAppendTime`, so
   its record timestamps are the broker's append times: documents/s = outputs / (last append -
   first append), tokens/s = the worker's `ner_stream_tokens_total` / the same window. The worker
   is then stopped with SIGTERM (its exit status and shutdown time are recorded).
2. Latency. A second worker on a second pair of fresh topics; an open-loop producer thread sends
   documents at fixed rates (fractions of the saturating documents/s) for a fixed time each,
   whatever the worker does, with each record's timestamp set to its scheduled send time.
   Latency of a document = its output's broker append time - its scheduled send time (matched by
   key, which the worker copies from the input). The first seconds of each rate are left out
   (warm-up) and every rate is drained before the next starts.
3. Exactly once: the saturation run again with `--processing-guarantee exactly-once` (outputs
   read with read_committed), and its latency at half the at-least-once saturating rate. There
   an output counts when a read_committed reader receives it (the reader runs during the rate):
   the broker's append time would hide the wait for the transaction's commit.
4. Memory: each worker's peak RSS (VmHWM in /proc/PID/status) and the largest
   `process_resident_memory_bytes` scraped from its /metrics.

The topics are deleted at the end (`--keep-topics` keeps them). Needs a broker (`make kafka-up`).

    python -m benchmarks.bench_e2e --model M.nerm --out benchmarks/results/e2e.json [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from benchmarks.common import (
    REPO,
    RESULTS,
    SCRATCH,
    display_path,
    host_info,
    log,
    percentile,
    quick_mode,
    write_json,
)
from benchmarks.corpus import DEFAULT_SEED, KINDS, documents
from ner_stream.config import WorkerConfig

OUTPUT_TOPIC_CONFIG = {"message.timestamp.type": "LogAppendTime"}


def local_bootstrap() -> str:
    """The local broker of deploy/kafka/kafka.sh (which honours KAFKA_PORT)."""
    return f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    worker = WorkerConfig()
    p = argparse.ArgumentParser(description="End-to-end benchmark through a Kafka broker.")
    p.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("NER_STREAM_BOOTSTRAP_SERVERS", local_bootstrap()),
        help="default: NER_STREAM_BOOTSTRAP_SERVERS, else the local broker (KAFKA_PORT, 9092)",
    )
    p.add_argument(
        "--model",
        default=os.environ.get("BENCH_MODEL"),
        help="model file (default: BENCH_MODEL, else the packaged model)",
    )
    p.add_argument(
        "--docs",
        type=int,
        default=int(os.environ.get("BENCH_DOCS", "0")) or None,
        help="documents for the saturation run (default 50000; BENCH_DOCS)",
    )
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--kind", choices=sorted(KINDS), default="short", help="corpus kind")
    p.add_argument(
        "--rates",
        type=floats,
        default=[0.25, 0.5, 0.75, 0.9],
        help="offered rates as fractions of the saturating documents/s",
    )
    p.add_argument("--rate-seconds", type=float, default=None, help="seconds per rate (20)")
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=None,
        help="first seconds of each rate left out of the latency figures (3)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=int,
        default=worker.max_wait_ms,
        help="the worker's --max-wait-ms (also used for the latency bound)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("BENCH_THREADS", "0")),
        help="model threads of the worker (default: the worker's own, every core but one)",
    )
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="extra argument for `ner-stream run` (repeatable)",
    )
    p.add_argument(
        "--saturation-timeout-s",
        type=float,
        default=None,
        help="stop the saturation run after this long and report what was done",
    )
    p.add_argument(
        "--no-exactly-once",
        dest="exactly_once",
        action="store_false",
        help="skip the exactly-once runs (step 3)",
    )
    p.add_argument(
        "--generator-nice",
        type=int,
        default=19,
        help="niceness of the load generator's threads (19: the worker and broker come first on "
        "a shared machine; 0: as before)",
    )
    p.add_argument("--drain-timeout-s", type=float, default=60.0)
    p.add_argument("--keep-topics", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke-run sizes (also BENCH_QUICK=1)")
    p.add_argument("--out", default=str(RESULTS / "e2e.json"))
    args = p.parse_args(argv)
    args.quick = quick_mode(args.quick)
    q = args.quick
    args.docs = args.docs or (2000 if q else 50_000)
    args.rate_seconds = args.rate_seconds or (6.0 if q else 20.0)
    args.warmup_seconds = (
        args.warmup_seconds if args.warmup_seconds is not None else (1.0 if q else 3.0)
    )
    args.saturation_timeout_s = args.saturation_timeout_s or (180.0 if q else 360.0)
    return args


# ------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_executable() -> str:
    exe = Path(sys.executable).with_name("ner-stream")
    if exe.exists():
        return str(exe)
    found = shutil.which("ner-stream")
    if not found:
        raise SystemExit("ner-stream is not installed in this environment (make install)")
    return found


def broker_version() -> str | None:
    """The Kafka version of the local broker, as pinned in deploy/kafka/pom.xml."""
    try:
        pom = (REPO / "deploy" / "kafka" / "pom.xml").read_text()
    except OSError:
        return None
    m = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    return m.group(1) if m else None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as written by the client)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                continue
    return out


def proc_status_bytes(pid: int, field: str) -> int | None:
    """A size field of /proc/PID/status (``VmHWM``, ``VmRSS``) in bytes (Linux), None when
    unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size of a process in bytes (Linux), None when unknown."""
    return proc_status_bytes(pid, "VmHWM")


def descendants(pid: int) -> list[int]:
    """The process ids of a process's children, their children and so on (Linux)."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []
    return [d for c in children for d in (c, *descendants(c))]


def tree_vm_hwm(pid: int) -> int | None:
    """Peak RSS of a worker and its model process, summed: pages they share (the libraries)
    count twice, so this is an upper bound on what they held at any one time."""
    peaks = [vm_hwm(p) for p in (pid, *descendants(pid))]
    known = [p for p in peaks if p is not None]
    return sum(known) if known else None


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux), 0 when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def machine_busy_s() -> float:
    """CPU seconds every core of the machine has spent busy so far (/proc/stat: not idle or
    waiting for I/O), 0 when unknown."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """Cores busy over an interval: the whole machine, this process (the load generator and its
    producer's I/O thread) and a worker with its model process; the rest is mostly the broker."""

    def __init__(self, worker_pid: int) -> None:
        self.worker_pid = worker_pid
        self.start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        tree = sum(process_cpu_s(p) for p in (self.worker_pid, *descendants(self.worker_pid)))
        return time.monotonic(), machine_busy_s(), time.process_time(), tree

    def cores(self) -> dict:
        wall, busy, own, tree = (b - a for a, b in zip(self.start, self._read(), strict=True))
        wall = max(wall, 1e-9)
        return {"machine": busy / wall, "load_generator": own / wall, "worker": tree / wall}


class Worker:
    """One `ner-stream run` subprocess with its metrics endpoint."""

    def __init__(
        self,
        args: argparse.Namespace,
        name: str,
        topics: tuple[str, str, str],
        exactly_once: bool = False,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        SCRATCH.mkdir(parents=True, exist_ok=True)
        self.log_path = SCRATCH / f"e2e-worker-{name}.log"
        in_t, out_t, dlq_t = topics
        cmd = [
            worker_executable(), "run",
            "--bootstrap-servers", args.bootstrap_servers,
            "--input-topic", in_t, "--output-topic", out_t, "--dlq-topic", dlq_t,
            "--group-id", f"{in_t}-group",
            "--metrics-host", "127.0.0.1", "--metrics-port", str(self.port),
            "--device", "cpu",
            "--max-wait-ms", str(args.max_wait_ms),
            "--log-level", "INFO",
        ]  # fmt: skip
        if args.model:
            cmd += ["--model", str(args.model)]
        if exactly_once:
            cmd += ["--processing-guarantee", "exactly-once", "--instance-id", f"bench-{name}"]
        cmd += args.worker_arg
        env = dict(os.environ)
        if args.threads > 0:
            env["OMP_NUM_THREADS"] = str(args.threads)
            env["NER_STREAM_TORCH_THREADS"] = str(args.threads)
        self.cmd = cmd
        self.peak_scraped_rss = 0.0
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.started = time.time()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        if not self.alive():
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(
                f"worker {self.name} exited with {self.proc.returncode}:\n" + "\n".join(tail)
            )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except OSError:
            return 0, ""

    def metrics(self) -> dict[str, float]:
        code, body = self.get("/metrics")
        if code != 200:
            return {}
        m = parse_metrics(body)
        rss = m.get("process_resident_memory_bytes", 0.0)
        self.peak_scraped_rss = max(self.peak_scraped_rss, rss)
        return m

    def wait_ready(self, timeout: float) -> float:
        """Wait for /readyz (model loaded, partitions assigned); seconds since start."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.check()
            if self.get("/readyz")[0] == 200:
                return time.time() - self.started
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.name} not ready after {timeout:.0f} s")

    def stop(self, timeout: float = 60.0) -> dict:
        """SIGTERM, wait; the exit code, shutdown seconds and peak RSS."""
        hwm = tree_vm_hwm(self.proc.pid)
        own = vm_hwm(self.proc.pid)
        self.metrics()
        t0 = time.time()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return {
            "exit_code": code,
            "shutdown_s": time.time() - t0,
            "peak_rss_bytes": hwm,
            "peak_rss_bytes_main_process": own,
            "peak_scraped_rss_bytes": self.peak_scraped_rss or None,
            "log": display_path(self.log_path),
        }


def docs_done(m: dict[str, float]) -> float:
    return m.get('ner_stream_documents_total{outcome="ok"}', 0.0) + m.get(
        'ner_stream_documents_total{outcome="dead_letter"}', 0.0
    )


def batch_stats(before: dict[str, float], after: dict[str, float]) -> dict:
    """Micro-batch figures between two scrapes of the same worker."""

    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    def mean(stage: str) -> float | None:
        n = d(f'ner_stream_stage_seconds_count{{stage="{stage}"}}')
        return d(f'ner_stream_stage_seconds_sum{{stage="{stage}"}}') / n if n else None

    inf_n = d('ner_stream_stage_seconds_count{stage="inference"}')
    inf_s = d('ner_stream_stage_seconds_sum{stage="inference"}')
    mb = d("ner_stream_batch_documents_count")
    pad_n = d("ner_stream_padding_ratio_count")
    return {
        "micro_batches": mb,
        "forward_passes": d("ner_stream_batches_total"),
        "mean_docs_per_micro_batch": d("ner_stream_batch_documents_sum") / mb if mb else None,
        "mean_inference_s_per_micro_batch": inf_s / inf_n if inf_n else None,
        "inference_s_total": inf_s,
        "mean_padding_ratio": d("ner_stream_padding_ratio_sum") / pad_n if pad_n else None,
        "tokens": d("ner_stream_tokens_total"),
        "dead_letters": d('ner_stream_documents_total{outcome="dead_letter"}'),
        # Where a document's time goes: the oldest document of each micro-batch waited this
        # long from the work queue to the model, and the forward passes' spans this long.
        "mean_batch_wait_s": mean("batch_wait"),
        "mean_spans_s_per_micro_batch": mean("spans"),
    }


class OutputReader:
    """Reads an output topic from the beginning on a thread: key -> broker append time (ms)."""

    def __init__(
        self, bootstrap: str, topic: str, partitions: int, exactly_once: bool = False
    ) -> None:
        # Exactly once: only committed outputs, each timed when this reader receives it (ms).
        self.receive_times = exactly_once
        self.times: dict[bytes, int] = {}
        self.count = 0
        self.timestamp_types: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_bytes=52_428_800,
            max_poll_records=5000,
            isolation_level="read_committed" if exactly_once else "read_uncommitted",
        )
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer.assign(self.tps)
        self.consumer.seek_to_beginning(*self.tps)
        self.thread = threading.Thread(target=self._run, name=f"read-{topic}", daemon=True)

    def start(self) -> OutputReader:
        """Start reading (once). The times are the broker's, so reading may start late."""
        if not self.thread.is_alive():
            self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for records in self.consumer.poll(timeout_ms=200).values():
                received = int(time.time() * 1000)
                with self._lock:
                    for r in records:
                        self.count += 1
                        self.timestamp_types.add(r.timestamp_type)
                        # the first output of a key counts (a redelivery comes later)
                        stamp = received if self.receive_times else r.timestamp
                        self.times.setdefault(r.key, stamp)

    def snapshot(self) -> tuple[int, dict[bytes, int]]:
        with self._lock:
            return self.count, dict(self.times)

    def take(self, keys) -> dict[bytes, int]:
        """The times of those of `keys` read so far, forgotten here (a long run, the soak, would
        otherwise keep every key it ever read)."""
        with self._lock:
            return {k: self.times.pop(k) for k in keys if k in self.times}

    def close(self) -> None:
        self._stop.set()
        if self.thread.is_alive():  # never started when no rate was run (`--rates ""`)
            self.thread.join(timeout=10)
        self.consumer.close()


# ------------------------------------------------------------------------------------ phases


def make_topics(admin: KafkaAdminClient, prefix: str, partitions: int) -> tuple[str, str, str]:
    names = (f"{prefix}-in", f"{prefix}-out", f"{prefix}-dlq")
    admin.create_topics(
        [
            NewTopic(names[0], partitions, 1),
            NewTopic(names[1], partitions, 1, topic_configs=OUTPUT_TOPIC_CONFIG),
            NewTopic(names[2], 1, 1),
        ]
    )
    return names


def encode(doc: dict) -> tuple[bytes, bytes]:
    return doc["id"].encode(), json.dumps(doc, ensure_ascii=False).encode()


def produce_all(bootstrap: str, topic: str, docs: list[dict]) -> dict:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=20,
        batch_size=262_144,
        max_request_size=4_194_304,
    )
    t0 = time.time()
    size = 0
    for doc in docs:
        key, value = encode(doc)
        size += len(value)
        producer.send(topic, value=value, key=key)
    producer.flush()
    producer.close()
    dt = time.time() - t0
    return {"docs": len(docs), "bytes": size, "seconds": dt, "docs_per_s": len(docs) / dt}


def saturation(args, admin, prefix: str, docs: list[dict], exactly_once: bool = False) -> dict:
    tag = "-eos" if exactly_once else ""
    topics = make_topics(admin, f"{prefix}-sat{tag}", args.partitions)
    log(f"producing {len(docs)} documents to {topics[0]} ...")
    produced = produce_all(args.bootstrap_servers, topics[0], docs)
    log(f"  {produced['docs_per_s']:.0f} docs/s, {produced['bytes'] / 1e6:.1f} MB")
    worker = Worker(args, f"saturation{tag}", topics, exactly_once)
    n = len(docs)
    deadline = worker.started + args.saturation_timeout_s
    last_log = 0.0
    m: dict[str, float] = {}
    complete = False
    try:
        ready_s = worker.wait_ready(120)
        while time.time() < deadline:
            worker.check()
            m = worker.metrics() or m
            done = docs_done(m)
            if done >= n:
                complete = True
                break
            if time.time() - last_log > 15:
                log(f"  saturation: {done:.0f}/{n} documents")
                last_log = time.time()
            time.sleep(0.5)
        wall = time.time() - worker.started
        m = worker.metrics() or m
    finally:
        stopped = worker.stop()
    if not complete:
        log(f"  saturation run stopped by its time limit after {docs_done(m):.0f} documents")
    # Append times even with exactly-once: throughput is when outputs were written.
    reader = OutputReader(args.bootstrap_servers, topics[1], args.partitions).start()
    deadline = time.time() + 60
    target = min(n, int(docs_done(m)))
    while time.time() < deadline and len(reader.snapshot()[1]) < target:
        time.sleep(0.2)
    count, times = reader.snapshot()
    types = sorted(reader.timestamp_types)
    reader.close()
    stamps = sorted(times.values())
    window = (stamps[-1] - stamps[0]) / 1000 if len(stamps) > 1 else None
    stats = batch_stats({}, m)
    # Tokens per document from the worker's counters (scraped just before SIGTERM), so that a run
    # cut by the time limit, whose last outputs come during shutdown, stays consistent.
    done = docs_done(m)
    tokens_per_doc = stats["tokens"] / done if done else None
    docs_per_s = len(times) / window if window else None
    result = {
        "topics": list(topics),
        "produce": produced,
        "complete": complete,
        "docs": n,
        "outputs_read": count,
        "distinct_outputs": len(times),
        "output_timestamp_types": types,  # 1 = LogAppendTime
        "window_s": window,
        "docs_per_s": docs_per_s,
        "tokens": stats["tokens"],
        "tokens_per_doc": tokens_per_doc,
        "tokens_per_s": docs_per_s * tokens_per_doc if docs_per_s and tokens_per_doc else None,
        "worker_ready_s": ready_s,
        "wall_s_from_worker_start": wall,
        "batches": stats,
        "worker": stopped,
    }
    if window:
        log(
            f"  saturation: {result['docs_per_s']:.0f} docs/s, "
            f"{result['tokens_per_s']:.0f} tokens/s over {window:.1f} s"
        )
    return result


def open_loop(
    producer: KafkaProducer, topic: str, docs: list[dict], prefix: str, rate: float, seconds: float
) -> tuple[dict[bytes, float], list[float]]:
    """Send at `rate` docs/s for `seconds`; {key: scheduled time} and how late each send was."""
    scheduled: dict[bytes, float] = {}
    lateness: list[float] = []
    t0 = time.time() + 0.05
    i = 0
    while True:
        due = t0 + i / rate
        if due >= t0 + seconds:
            break
        now = time.time()
        if due > now:
            time.sleep(due - now)
            now = time.time()
        doc = docs[i % len(docs)]
        key = f"{prefix}-{i}".encode()
        value = json.dumps({"id": key.decode(), "text": doc["text"]}, ensure_ascii=False)
        producer.send(topic, value=value.encode(), key=key, timestamp_ms=int(due * 1000))
        scheduled[key] = due
        lateness.append(now - due)
        i += 1
    producer.flush()
    return scheduled, lateness


def lower_priority(niceness: int) -> None:
    """Lower the calling thread's priority (Linux: niceness is per thread, and threads started
    from it inherit it); nothing where that is not possible."""
    if niceness:
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


def latency(
    args,
    admin,
    prefix: str,
    docs: list[dict],
    sat_docs_per_s: float,
    exactly_once: bool = False,
    rates: list[float] | None = None,
) -> dict:
    tag = "-eos" if exactly_once else ""
    topics = make_topics(admin, f"{prefix}-lat{tag}", args.partitions)
    reader = OutputReader(args.bootstrap_servers, topics[1], args.partitions, exactly_once)
    worker = Worker(args, f"latency{tag}", topics, exactly_once)
    # linger.ms 5 is the Java producer's default since Kafka 4.0: records sent within 5 ms share a
    # batch, as they would from a typical upstream producer. Latency is still counted from each
    # record's scheduled send time, so the linger is part of it.
    # The load generator stands for producers that run elsewhere in production; on a small
    # machine its Python (about 1.3 ms of CPU per record, most of it kafka-python's I/O thread)
    # would take the cores the worker was measured with at saturation. At a low priority it uses
    # what the worker and broker leave; any delay that costs it still counts against the worker,
    # since latency runs from each record's scheduled send time.
    generator = ThreadPoolExecutor(1, "load-generator", lower_priority, (args.generator_nice,))
    producer = generator.submit(
        KafkaProducer, bootstrap_servers=args.bootstrap_servers, acks=1, linger_ms=5
    ).result()  # created on the niced thread: its I/O thread inherits the niceness
    runs = []
    try:
        ready_s = worker.wait_ready(120)
        if exactly_once:
            reader.start()  # receive times: the reader runs while the load is offered
        for k, fraction in enumerate(args.rates if rates is None else rates):
            rate = fraction * sat_docs_per_s
            log(
                f"latency: {fraction:.0%} of saturation = {rate:.1f} docs/s "
                f"for {args.rate_seconds:g} s"
            )
            before = worker.metrics()
            cpu = CpuShare(worker.proc.pid)
            scheduled, lateness = generator.submit(
                open_loop, producer, topics[0], docs, f"rate{k}", rate, args.rate_seconds
            ).result()
            cores = cpu.cores()  # while the load was offered
            # Output append times are the broker's (LogAppendTime), so the outputs are read only
            # once the offered load has been sent: reading them meanwhile would take CPU from
            # the worker on a small machine.
            reader.start()
            deadline = time.time() + args.drain_timeout_s
            while time.time() < deadline:
                worker.check()
                worker.metrics()
                _, times = reader.snapshot()
                if all(key in times for key in scheduled):
                    break
                time.sleep(0.2)
            after = worker.metrics()
            _, times = reader.snapshot()
            start = min(scheduled.values(), default=0.0) + args.warmup_seconds
            lat = sorted(
                times[key] / 1000 - due
                for key, due in scheduled.items()
                if key in times and due >= start
            )
            missing = sum(1 for key in scheduled if key not in times)
            lateness.sort()
            run = {
                "fraction": fraction,
                "offered_docs_per_s": rate,
                "seconds": args.rate_seconds,
                "sent": len(scheduled),
                "measured": len(lat),
                "missing_after_drain": missing,
                "p50_s": percentile(lat, 50),
                "p90_s": percentile(lat, 90),
                "p99_s": percentile(lat, 99),
                "max_s": lat[-1] if lat else None,
                "producer_lateness_p99_s": percentile(lateness, 99),
                "producer_lateness_max_s": lateness[-1] if lateness else None,
                "batches": batch_stats(before, after),
                "cpu_cores": cores,
            }
            runs.append(run)
            if lat:
                log(
                    f"  p50 {run['p50_s'] * 1000:.0f} ms, p99 {run['p99_s'] * 1000:.0f} ms, "
                    f"{missing} missing"
                )
    finally:
        producer.close()
        generator.shutdown()
        stopped = worker.stop()
        reader.close()
    return {"topics": list(topics), "worker_ready_s": ready_s, "runs": runs, "worker": stopped}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import kafka
    import torch

    prefix = f"bench-e2e-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap_servers, request_timeout_ms=30_000)
    docs = documents(args.docs, args.seed, kind=args.kind)
    result: dict = {
        "benchmark": "end_to_end",
        "mode": "quick" if args.quick else "full",
        "host": host_info(),
        "versions": {
            "torch": torch.__version__,
            "kafka_python": kafka.__version__,
            "kafka_broker": broker_version(),
        },
        "settings": {
            "docs": args.docs,
            "seed": args.seed,
            "kind": args.kind,
            "words": sum(len(d["text"].split()) for d in docs),
            "partitions": args.partitions,
            "rates": args.rates,
            "rate_seconds": args.rate_seconds,
            "warmup_seconds": args.warmup_seconds,
            "max_wait_ms": args.max_wait_ms,
            "threads": args.threads or None,
            "worker_args": args.worker_arg,
            "generator_nice": args.generator_nice,
            "model": display_path(args.model) if args.model else "packaged",
            "bootstrap_servers": args.bootstrap_servers,
        },
    }
    created = []
    try:
        sat = saturation(args, admin, prefix, docs)
        created += sat["topics"]
        result["saturation"] = sat
        if not sat["docs_per_s"]:
            raise RuntimeError("the saturation run produced no throughput figure")
        lat = latency(args, admin, prefix, docs, sat["docs_per_s"])
        created += lat["topics"]
        result["latency"] = lat
        if args.exactly_once:
            eos_sat = saturation(args, admin, prefix, docs, exactly_once=True)
            eos_lat = latency(args, admin, prefix, docs, sat["docs_per_s"], exactly_once=True,
                              rates=[0.5])  # fmt: skip
            result["exactly_once"] = {"saturation": eos_sat, "latency": eos_lat}
    finally:
        if not args.keep_topics:
            try:
                names = [t for t in admin.list_topics() if t.startswith(prefix)]
                if names:
                    admin.delete_topics(names)
            except Exception as e:  # noqa: BLE001 - cleanup must not hide the result
                log(f"could not delete the benchmark topics: {e}")
        admin.close()

    inference = sat["batches"]["mean_inference_s_per_micro_batch"] or 0.0
    bound = args.max_wait_ms / 1000 + 3 * inference
    half = min(lat["runs"], key=lambda r: abs(r["fraction"] - 0.5), default=None)
    three_quarters = next((r for r in lat["runs"] if abs(r["fraction"] - 0.75) < 1e-9), None)
    rss = [
        w.get(k)
        for w in (sat["worker"], lat["worker"])
        for k in ("peak_rss_bytes", "peak_scraped_rss_bytes")
    ]
    result["summary"] = {
        "docs_per_s": sat["docs_per_s"],
        "tokens_per_s": sat["tokens_per_s"],
        "inference_s_per_micro_batch_at_saturation": inference,
        "p99_bound_s": bound,
        "p99_at_half_s": half and half["p99_s"],
        "p99_at_half_fraction": half and half["fraction"],
        "p99_at_three_quarters_s": three_quarters and three_quarters["p99_s"],
        "peak_rss_bytes": max((r for r in rss if r), default=None),
    }
    eos = result.get("exactly_once")
    if eos:
        eos_dps = eos["saturation"]["docs_per_s"]
        eos_half = eos["latency"]["runs"][0] if eos["latency"]["runs"] else None
        result["summary"].update(
            {
                "exactly_once_docs_per_s": eos_dps,
                "exactly_once_tokens_per_s": eos["saturation"]["tokens_per_s"],
                # Share of the at-least-once throughput lost to transactions, this run.
                "exactly_once_cost": 1 - eos_dps / sat["docs_per_s"] if eos_dps else None,
                "exactly_once_p99_at_half_s": eos_half and eos_half["p99_s"],
            }
        )
    result["host"]["load_average_after"] = host_info()["load_average"]
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
