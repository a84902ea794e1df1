"""Helpers for the end-to-end tests of `ner-stream run`: a tiny random-weight model file, the
worker as a real subprocess, producing documents, and reading the output, dead-letter and offset
state back from the broker.

Everything waits on a condition with a deadline; nothing sleeps for a fixed time to "let things
settle"."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from tests import kafka_util


@dataclass(frozen=True)
class Topics:
    """The topics and consumer group of one worker under test."""

    input: str
    output: str
    dlq: str
    group: str


# ------------------------------------------------------------------------------------ model file

TAGS = ["O"] + [f"{p}-{t}" for t in ("PER", "LOC", "ORG", "MISC") for p in "BIES"]
WORDS = ["<PAD>", "<UNK>", "peter", "went", "to", "paris", "berlin", "acme", "the", "and", "."]


def build_tiny_model(path: Path, name: str = "tiny-random", version: str = "0.0.1") -> Path:
    """Write a small random-weight LSTM tagger (no CRF: fast on a busy CPU) to `path`,
    atomically (a temporary file renamed over it).

    The weights are random, so the predicted entities are arbitrary; what the tests check is the
    message contract around them. Every version has the same weights and tags.
    """
    from ner_stream.checkpoint import save
    from tests.fakes import random_model

    loaded = random_model(1234, arch="lstm", words=WORDS, tags=TAGS, name=name, version=version)
    save(path, loaded.model, loaded.info)
    return path


# ------------------------------------------------------------------------------------ documents

_NAMES = [
    "Peter",
    "Ada Lovelace",
    "José Álvarez",
    "Zoë",
    "Ørsted",
    "Łukasz",
    "Søren Kierkegaard",
    "李小龍",
    "Владимир",
    "محمد",
    "Ngũgĩ",
    "François",
]
_PLACES = [
    "Paris",
    "Berlin",
    "São Paulo",
    "Zürich",
    "東京",
    "Москва",
    "Kraków",
    "Reykjavík",
    "New York",
    "القاهرة",
    "Ümraniye",
    "Cañón",
]
_EXTRAS = [
    "",
    " 🎉",
    " (café)",
    " — naïve résumé",
    " 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    " e\u0301 combining",
    "\tTab",
    "\n\nNew paragraph.",
    " U.S.A. and A.C.M.E. Corp.",
    " 👩‍👩‍👧 family",
]


def doc_text(i: int) -> str:
    """A varied short text: names, places, accents, CJK, RTL, emoji (astral), combining marks."""
    name = _NAMES[i % len(_NAMES)]
    place = _PLACES[(i * 7) % len(_PLACES)]
    extra = _EXTRAS[(i * 3) % len(_EXTRAS)]
    match i % 7:
        case 0:
            return f"{name} went to {place}.{extra}"
        case 1:
            return f"Yesterday {name} met the mayor of {place} and Acme Inc.{extra} Doc {i}."
        case 2:
            return f"{place}: {name} says hello 👋 to everyone ({i})."
        case 3:
            return ""  # an empty text is valid: an output with no entities
        case 4:
            return f"  leading spaces, {name}; {place}!{extra}  "
        case 5:
            # Long enough to be cut into several windows with --max-chunk-tokens 16.
            return " ".join(f"{name} visited {place} on day {k}" for k in range(6)) + "."
        case _:
            return f"{name} {name} {place} {place} {extra} #{i}"


@dataclass(frozen=True)
class Produced:
    """One record as produced: where it landed and what it carried."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    partition: int
    offset: int


def make_producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        request_timeout_ms=kafka_util.CLIENT_REQUEST_TIMEOUT_MS,
        max_block_ms=kafka_util.CLIENT_REQUEST_TIMEOUT_MS,
    )


def produce_records(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
    rate_per_s: float | None = None,
    producer: KafkaProducer | None = None,
) -> list[Produced]:
    """Produce (key, value, headers) records in order, flush, and say where each landed.

    With ``rate_per_s`` the records are sent in small bursts spread over time (a stream, not a
    bulk load), so that a worker is still busy with them while a test acts on it.
    """
    own = producer is None
    producer = producer or make_producer(bootstrap)
    try:
        futures = []
        t0 = time.monotonic()
        for n, (key, value, headers) in enumerate(records):
            if rate_per_s and n % 50 == 0:
                ahead = t0 + n / rate_per_s - time.monotonic()
                if ahead > 0:
                    producer.flush(timeout=30)
                    time.sleep(ahead)
            futures.append(producer.send(topic, key=key, value=value, headers=headers or None))
        producer.flush(timeout=30)
        out = []
        for (key, value, headers), future in zip(records, futures, strict=True):
            md = future.get(timeout=1)  # re-raises a failed send instead of losing it
            out.append(Produced(key, value, tuple(headers), md.partition, md.offset))
        return out
    finally:
        if own:
            producer.close(timeout=10)


def doc_records(ids: Iterable[str]) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """Valid documents keyed by id, each with two headers of its own."""
    out = []
    for doc_id in ids:
        i = int(doc_id.rsplit("-", 1)[1])
        value = {"id": doc_id, "text": doc_text(i)}
        if i % 10 == 0:
            value["lang"] = "xx"  # an extra field: carried through as meta
        headers = [("trace-id", f"t-{doc_id}".encode()), ("origin", "tests/é".encode())]
        out.append((doc_id.encode(), json.dumps(value, ensure_ascii=False).encode(), headers))
    return out


class BackgroundProducer(threading.Thread):
    """Produces a list of records at a steady rate on its own thread; `result()` joins it."""

    def __init__(self, bootstrap: str, topic: str, records, rate_per_s: float) -> None:
        super().__init__(daemon=True, name="test-producer")
        self.args = (bootstrap, topic, records, rate_per_s)
        self.produced: list[Produced] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.produced = produce_records(*self.args[:3], rate_per_s=self.args[3])
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = 120) -> list[Produced]:
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError("the background producer did not finish")
        if self.error is not None:
            raise self.error
        assert self.produced is not None
        return self.produced


# ------------------------------------------------------------------------------------ reading back


@dataclass
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def json(self) -> dict:
        assert self.value is not None
        return json.loads(self.value.decode("utf-8"))


class TopicReader:
    """Reads a whole topic from the beginning without a group (nothing is committed).

    `client` adds kafka-python settings (security, for a SASL_SSL broker).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        json_ids: bool = False,
        isolation: str = "read_uncommitted",
        client: Mapping[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        # With json_ids, the "id" of every record value is counted as it arrives (output topic).
        self.json_ids = json_ids
        self.ids: Counter[str] = Counter()
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            request_timeout_ms=kafka_util.CLIENT_REQUEST_TIMEOUT_MS + 5_000,
            isolation_level=isolation,
            **(client or {}),
        )
        partitions = self.consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + 30
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.1)
            self.consumer.topics()
            partitions = self.consumer.partitions_for_topic(topic)
        assert partitions, f"no metadata for topic {topic!r}"
        self.tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self.consumer.assign(self.tps)
        self.consumer.seek_to_beginning(*self.tps)
        self.records: list[Record] = []

    def poll(self, timeout_ms: int = 200) -> int:
        """Fetch what is there; return how many records arrived."""
        n = 0
        for tp, messages in self.consumer.poll(timeout_ms=timeout_ms).items():
            for m in messages:
                headers = [(k, v) for k, v in (m.headers or [])]
                record = Record(tp.partition, m.offset, m.key, m.value, headers)
                self.records.append(record)
                if self.json_ids:
                    self.ids[record.json()["id"]] += 1
                n += 1
        return n

    def read_to_end(self, timeout_s: float = 30) -> list[Record]:
        """Everything up to the current end offsets of every partition."""
        end = self.consumer.end_offsets(self.tps)
        deadline = time.monotonic() + timeout_s
        while any(self.consumer.position(tp) < end[tp] for tp in self.tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {self.topic} to its end offsets {end}")
            self.poll()
        return self.records

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_results(
    bootstrap: str,
    topics: Topics,
    until: Callable[[TopicReader, TopicReader], object],
    timeout_s: float,
    what: str | Callable[[TopicReader, TopicReader], str],
    workers: Sequence[WorkerProcess] = (),
    then: Callable[[], object] | None = None,
) -> tuple[list[Record], list[Record]]:
    """Read the output and dead-letter topics until `until(outputs, dead_letters)` holds (see
    `wait_for`), run `then` (stopping a worker, say), and return both topics read to the end."""
    with (
        TopicReader(bootstrap, topics.output, json_ids=True) as out_reader,
        TopicReader(bootstrap, topics.dlq) as dlq_reader,
    ):

        def poll() -> None:
            out_reader.poll(100)
            dlq_reader.poll(100)

        described = what if isinstance(what, str) else (lambda: what(out_reader, dlq_reader))
        wait_for(lambda: until(out_reader, dlq_reader), timeout_s, described, workers, tick=poll)
        if then is not None:
            then()
        return out_reader.read_to_end(), dlq_reader.read_to_end()


def outputs_by_id(records: Iterable[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r.json()["id"], []).append(r)
    return out


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: o for tp, o in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def committed_offsets(
    bootstrap: str,
    group: str,
    topic: str,
    partitions: int,
    client: Mapping[str, Any] | None = None,
) -> dict[int, int]:
    """The group's committed offsets for `topic`, by partition (absent: never committed).

    Read with a consumer of the group that never subscribes, so it does not join the group; this
    works the same on kafka-python 2.x and 3.x (whose admin clients name the call differently).
    `client` adds kafka-python settings (security, for a SASL_SSL broker).
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, **(client or {})
    )
    try:
        out = {}
        for p in range(partitions):
            offset = consumer.committed(TopicPartition(topic, p))
            if offset is not None:
                out[p] = offset
        return out
    finally:
        consumer.close(autocommit=False)


# ------------------------------------------------------------------------------------ the worker


def ner_stream_executable() -> str:
    """The `ner-stream` console script of the environment running the tests."""
    beside = Path(sys.executable).parent / "ner-stream"
    if beside.exists():
        return str(beside)
    found = shutil.which("ner-stream")
    if found is None:
        raise RuntimeError("the ner-stream console script is not installed (pip install -e .)")
    return found


@dataclass
class WorkerProcess:
    """One `ner-stream run` subprocess; its stdout and stderr go to a log file."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # set on top of the cleaned environment
    proc: subprocess.Popen = field(init=False)
    started_at: float = field(init=False, default=0.0)

    def start(self) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NER_STREAM_")}
        env["PYTHONUNBUFFERED"] = "1"
        # The worker is one of several processes on a small machine: keep torch to one thread.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        env.update(self.env)
        self._log = self.log_path.open("wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [ner_stream_executable(), "run", *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.name} (pid {self.pid}) still running after {timeout}s; "
                f"log:\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL (no clean-up at all) and reap."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        self.kill()
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def assigned(self) -> set[int] | None:
        """Partitions of the last "partitions assigned" log line, None before the first one."""
        found = re.findall(r"partitions assigned: \[(.*)\]", self.log())
        if not found:
            return None
        return {int(p) for p in re.findall(r", (\d+)\)", found[-1])}


def wait_for(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str | Callable[[], str],
    workers: Sequence[WorkerProcess] = (),
    tick: Callable[[], object] | None = None,
    interval_s: float = 0.05,
) -> None:
    """Poll `condition` until true; fail early, with its log, if a worker that should run exits.

    `tick` (polling a reader, say) runs before each check and paces the loop when it blocks.
    `what` may be a callable, to describe the state reached when the wait fails.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if tick is not None:
            tick()
        if condition():
            return
        for w in workers:
            if not w.alive():
                raise AssertionError(
                    f"worker {w.name} exited with {w.proc.returncode} while waiting for "
                    f"{_describe(what)}; log:\n{w.tail()}"
                )
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {w.name}:\n{w.tail()}" for w in workers)
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for {_describe(what)}\n{logs}"
            )
        if tick is None:
            time.sleep(interval_s)


def _describe(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def ids_progress(reader: TopicReader, ids: Sequence[str], what: str = "every id"):
    """A `wait_for` description: how many of `ids` the reader saw, and a few missing ones."""

    def describe() -> str:
        missing = [i for i in ids if i not in reader.ids]
        return f"{what} ({len(ids) - len(missing)}/{len(ids)} seen; missing e.g. {missing[:5]})"

    return describe
