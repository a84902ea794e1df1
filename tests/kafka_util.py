"""Helpers shared by the test fixtures and the integration tests: where a Kafka broker comes from
(environment, Docker, or the local broker managed by ``deploy/kafka/kafka.sh``) and small wrappers
around kafka-python that work the same on its 2.x and 3.x releases."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO_ROOT / "deploy" / "kafka" / "kafka.sh"
# The broker's jars as kafka.sh resolves them (Kafka's own command-line tools are among them).
KAFKA_LIB_DIR = REPO_ROOT / "deploy" / "kafka" / ".cache" / "lib"

# kafka.sh waits up to KAFKA_START_TIMEOUT (60 s) for the broker itself; the first run also
# downloads the jars with Maven, so the wrapper allows for that on top.
KAFKA_SH_TIMEOUT_S = 600

# Short client-side timeouts make a broken broker fail a test instead of hanging it.
CLIENT_REQUEST_TIMEOUT_MS = 10_000


class LocalBrokerError(RuntimeError):
    """``kafka.sh`` failed; the message carries its output."""


def local_bootstrap() -> str:
    """Bootstrap address of the broker that ``kafka.sh`` runs (it honours ``KAFKA_PORT`` too)."""
    return f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"


def kafka_sh(command: str) -> subprocess.CompletedProcess[str]:
    """Run ``kafka.sh <command>`` (up, down, status, reset) and return the finished process."""
    return subprocess.run(
        [str(KAFKA_SH), command],
        capture_output=True,
        text=True,
        timeout=KAFKA_SH_TIMEOUT_S,
        check=False,
    )


def local_broker_running() -> bool:
    """True when ``kafka.sh status`` reports a broker started by it (exit status 0)."""
    return kafka_sh("status").returncode == 0


def start_local_broker() -> None:
    """Start the local broker (a quick no-op when it runs); raise LocalBrokerError on failure."""
    result = kafka_sh("up")
    if result.returncode != 0:
        raise LocalBrokerError(
            f"{KAFKA_SH} up failed with exit status {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )


def stop_local_broker() -> None:
    """Stop the local broker; raise LocalBrokerError if ``kafka.sh down`` fails."""
    result = kafka_sh("down")
    if result.returncode != 0:
        raise LocalBrokerError(f"{KAFKA_SH} down failed:\n{result.stdout}{result.stderr}")


def docker_available() -> bool:
    """True when a Docker engine answers a ping within a couple of seconds.

    Any failure (no SDK, no socket, engine down, permission denied) means "no Docker": the caller
    then falls back to the local broker instead of failing.
    """
    try:
        import docker  # installed with testcontainers; imported lazily as it is optional here
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def unique_name(prefix: str) -> str:
    """A topic or group name that no earlier test run can have used."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_topic(
    admin: KafkaAdminClient,
    name: str,
    partitions: int,
    timeout_s: float = 30.0,
    configs: Mapping[str, str] | None = None,
) -> None:
    """Create a topic with one replica and wait until every partition has a leader.

    ``configs`` are topic configs such as ``{"max.message.bytes": "5242880"}``. CreateTopics
    returns once the controller has accepted the topic; clients that look it up right away may
    still see no leader, so this polls the metadata until all partitions are led.
    """
    admin.create_topics(
        [
            NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=1,
                topic_configs=dict(configs or {}),
            )
        ]
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _leaders_ready(admin, name, partitions):
            return
        time.sleep(0.1)
    raise TimeoutError(
        f"topic {name!r}: some of {partitions} partitions lack a leader after {timeout_s}s"
    )


def _leaders_ready(admin: KafkaAdminClient, name: str, partitions: int) -> bool:
    (topic,) = admin.describe_topics([name])
    if topic.get("error_code", 0) != 0:
        return False
    # kafka-python 2.x names the fields "partition"/"leader", 3.x "partition_index"/"leader_id".
    leaders = [p.get("leader_id", p.get("leader", -1)) for p in topic.get("partitions", [])]
    return len(leaders) == partitions and all(leader >= 0 for leader in leaders)


@dataclass(frozen=True)
class ProducedRecords:
    """What ``produce_keyed`` wrote: every (key, value) pair and the record count per partition."""

    pairs: frozenset[tuple[bytes, bytes]]
    per_partition: dict[int, int]

    @property
    def total(self) -> int:
        """Number of records written."""
        return sum(self.per_partition.values())


def produce_keyed(
    bootstrap: str, topic: str, count: int, distinct_keys: int = 1000
) -> ProducedRecords:
    """Produce ``count`` keyed records with acks=all, flush, and report where they landed.

    Keys repeat (``distinct_keys`` of them) so that the default partitioner spreads them over every
    partition; values are unique, so each (key, value) pair identifies one record.
    """
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        request_timeout_ms=CLIENT_REQUEST_TIMEOUT_MS,
        max_block_ms=CLIENT_REQUEST_TIMEOUT_MS,
    )
    try:
        futures = []
        pairs = set()
        for i in range(count):
            key = f"key-{i % distinct_keys}".encode()
            value = f"value-{i}".encode()
            pairs.add((key, value))
            futures.append(producer.send(topic, key=key, value=value))
        producer.flush(timeout=30)
        # After flush every future is done; get() re-raises a failed send instead of losing it.
        partitions = Counter(f.get(timeout=1).partition for f in futures)
    finally:
        producer.close(timeout=10)
    return ProducedRecords(pairs=frozenset(pairs), per_partition=dict(partitions))


# ------------------------------------------------------------------------------ Kafka's own tools


def kafka_tools_missing() -> str | None:
    """Why Kafka's Java command-line tools cannot run here, or None when they can."""
    if shutil.which("java") is None:
        return "java is not on PATH (Kafka's own tools need Java 17+)"
    if not any(KAFKA_LIB_DIR.glob("kafka-tools-*.jar")):
        return (
            f"no Kafka jars in {KAFKA_LIB_DIR.relative_to(REPO_ROOT)}: "
            f"run `{KAFKA_SH.relative_to(REPO_ROOT)} up` once to resolve them"
        )
    return None


def console_produce(
    bootstrap: str,
    topic: str,
    lines: Sequence[str],
    *,
    compression: str | None = None,
    reader_properties: Mapping[str, str] | None = None,
    command_properties: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
) -> None:
    """Write records with the broker's own Java producer, ``kafka-console-producer``.

    Each of ``lines`` is one record, parsed by Kafka's ``LineMessageReader`` as
    ``reader_properties`` say (``parse.key``, ``parse.headers``, ``null.marker``, the
    separators...); ``compression`` is its ``--compression-codec`` (gzip, snappy, lz4, zstd);
    ``command_properties`` are producer configs. It writes what kafka-python cannot (a null key
    with a null value, a null header value) and batches compressed by another client. Records are
    sent one at a time and acknowledged by all replicas before this returns; a failed send raises.
    Skips the calling test when java or the jar cache is missing.
    """
    missing = kafka_tools_missing()
    if missing:
        pytest.skip(missing)
    for line in lines:
        assert "\n" not in line and "\r" not in line, f"one record per line: {line!r}"
    cmd = [
        "java",
        # A short-lived client: C1 only and a small heap start the JVM fastest on a busy machine.
        "-XX:TieredStopAtLevel=1",
        "-XX:+UseSerialGC",
        "-Xmx256m",
        "-cp",
        f"{KAFKA_LIB_DIR}/*",
        "org.apache.kafka.tools.ConsoleProducer",
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--sync",  # each send waits for its ack, and a failed one exits non-zero
        "--request-required-acks",
        "all",
    ]
    if compression:
        cmd += ["--compression-codec", compression]
    for key, value in (reader_properties or {}).items():
        cmd += ["--reader-property", f"{key}={value}"]
    for key, value in (command_properties or {}).items():
        cmd += ["--command-property", f"{key}={value}"]
    stdin = "".join(line + "\n" for line in lines)
    result = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"kafka-console-producer exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
