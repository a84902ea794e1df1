"""End-to-end checks of the Kafka broker the worker relies on: keyed production with acks=all,
partition sharing within a consumer group, and manual offset commits surviving a consumer restart.

These run against a real broker (see the ``kafka_bootstrap`` fixture) with kafka-python."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
from kafka import KafkaConsumer, TopicPartition

from tests import kafka_util

pytestmark = pytest.mark.integration

RECORDS = 10_000
PARTITIONS = 3
# Upper bounds for each waiting phase; a healthy local broker needs a few seconds in total.
GROUP_JOIN_TIMEOUT_S = 30
CONSUME_TIMEOUT_S = 30


def _consumer(bootstrap: str, group_id: str | None, **overrides) -> KafkaConsumer:
    config = {
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "request_timeout_ms": kafka_util.CLIENT_REQUEST_TIMEOUT_MS + 5_000,
        # A closed member leaves the group explicitly, but a crashed test thread would not: keep the
        # session short so that a leftover member cannot stall the next rebalance for long.
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 1_000,
    }
    config.update(overrides)
    return KafkaConsumer(**config)


def _subscribed_consumer(bootstrap: str, group_id: str, topic: str, **overrides) -> KafkaConsumer:
    consumer = _consumer(bootstrap, group_id, **overrides)
    consumer.subscribe([topic])
    # Load the topic's metadata before the first poll joins the group. Otherwise the first
    # assignment can be computed without it (empty), and the metadata arriving afterwards triggers
    # a second rebalance; kafka-python 3.0.x loses the leader's assignment when a poll timeout
    # expires during such a metadata-triggered rebalance, leaving it with no partitions.
    consumer.topics()
    return consumer


@pytest.fixture(scope="module")
def loaded_topic(kafka_bootstrap, topic_factory) -> tuple[str, kafka_util.ProducedRecords]:
    """A 3-partition topic holding 10,000 keyed records, written before any consumer starts."""
    topic = topic_factory(partitions=PARTITIONS, prefix="loaded")
    produced = kafka_util.produce_keyed(kafka_bootstrap, topic, RECORDS)
    return topic, produced


class _GroupMember(threading.Thread):
    """Polls one consumer of a group on its own thread (a KafkaConsumer is not thread-safe, so each
    consumer stays on the thread that created it) and publishes what it saw under a shared lock."""

    def __init__(self, bootstrap: str, group_id: str, topic: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.topic = topic
        self.stop = stop
        self.lock = threading.Lock()
        self.assignment: frozenset[int] = frozenset()
        self.records: list[tuple[bytes, bytes]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            consumer = _subscribed_consumer(self.bootstrap, self.group_id, self.topic)
            try:
                while not self.stop.is_set():
                    batches = consumer.poll(timeout_ms=200)
                    with self.lock:
                        self.assignment = frozenset(tp.partition for tp in consumer.assignment())
                        for messages in batches.values():
                            self.records.extend((m.key, m.value) for m in messages)
            finally:
                consumer.close()
        except BaseException as exc:  # re-raised by the test thread, which owns the failure
            self.error = exc

    def snapshot(self) -> tuple[frozenset[int], int]:
        """Current (assigned partitions, number of records received)."""
        with self.lock:
            return self.assignment, len(self.records)


def _wait_for(condition, timeout_s: float, members: list[_GroupMember], what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for member in members:
            if member.error is not None:
                raise member.error
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


def test_two_consumers_split_partitions_and_get_every_record_once(kafka_bootstrap, topic_factory):
    topic = topic_factory(partitions=PARTITIONS, prefix="split")
    group_id = kafka_util.unique_name("split-group")
    stop = threading.Event()
    members = [_GroupMember(kafka_bootstrap, group_id, topic, stop) for _ in range(2)]
    for member in members:
        member.start()
    try:
        # Produce only once both members hold their share: records fetched before a rebalance
        # would be fetched again by the new owner (nothing is committed), which is a property of
        # the test set-up, not of the broker.
        def split_settled() -> bool:
            first, second = (member.snapshot()[0] for member in members)
            return (
                bool(first)
                and bool(second)
                and first.isdisjoint(second)
                and first | second == set(range(PARTITIONS))
            )

        _wait_for(split_settled, GROUP_JOIN_TIMEOUT_S, members, "both consumers to get partitions")

        produced = kafka_util.produce_keyed(kafka_bootstrap, topic, RECORDS)

        def all_received() -> bool:
            return sum(member.snapshot()[1] for member in members) >= RECORDS

        _wait_for(all_received, CONSUME_TIMEOUT_S, members, f"{RECORDS} records")
        # A short grace period lets duplicates, if the broker delivered any, show up in the count.
        time.sleep(0.5)
    finally:
        stop.set()
        for member in members:
            member.join(timeout=15)
    for member in members:
        if member.error is not None:
            raise member.error

    first, second = (member.assignment for member in members)
    assert first and second, "each consumer must own at least one partition"
    assert first.isdisjoint(second)
    assert first | second == set(range(PARTITIONS))
    assert all(member.records for member in members), "both consumers should have received data"

    received = [pair for member in members for pair in member.records]
    assert len(received) == RECORDS == produced.total
    assert set(received) == produced.pairs


def test_consumer_resumes_at_committed_offset_after_restart(kafka_bootstrap, loaded_topic):
    topic, produced = loaded_topic
    group_id = kafka_util.unique_name("resume-group")
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    # First run: consume part of the topic, commit the positions reached, and close.
    consumer = _subscribed_consumer(kafka_bootstrap, group_id, topic, max_poll_records=500)
    try:
        consumed = 0
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while consumed < RECORDS // 4 and time.monotonic() < deadline:
            consumed += sum(len(m) for m in consumer.poll(timeout_ms=500).values())
        assert consumed >= RECORDS // 4, "the first consumer received too little to test a resume"
        consumer.commit()
        committed = {tp.partition: consumer.committed(tp) or 0 for tp in partitions}
    finally:
        consumer.close()
    assert 0 < sum(committed.values()) < RECORDS, f"commit should be mid-way, got {committed}"

    # Second run, same group: it must start exactly at the committed offsets and read the rest.
    remaining = RECORDS - sum(committed.values())
    offsets: dict[int, list[int]] = defaultdict(list)
    consumer = _subscribed_consumer(kafka_bootstrap, group_id, topic)
    try:
        received = 0
        deadline = time.monotonic() + CONSUME_TIMEOUT_S
        while received < remaining and time.monotonic() < deadline:
            for tp, messages in consumer.poll(timeout_ms=500).items():
                offsets[tp.partition].extend(m.offset for m in messages)
                received += len(messages)
        assert {tp.partition: consumer.committed(tp) or 0 for tp in partitions} == committed
    finally:
        consumer.close()

    for p in range(PARTITIONS):
        expected = list(range(committed[p], produced.per_partition.get(p, 0)))
        assert offsets.get(p, []) == expected, f"partition {p} did not resume at {committed[p]}"


def test_end_offsets_add_up_to_records_produced(kafka_bootstrap, loaded_topic):
    topic, produced = loaded_topic
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer = _consumer(kafka_bootstrap, group_id=None)
    try:
        beginning = consumer.beginning_offsets(partitions)
        end = consumer.end_offsets(partitions)
    finally:
        consumer.close()

    assert all(offset == 0 for offset in beginning.values())
    assert sum(end.values()) == RECORDS == produced.total
    assert {tp.partition: offset for tp, offset in end.items()} == {
        p: produced.per_partition.get(p, 0) for p in range(PARTITIONS)
    }


def test_worker_clients_take_the_fetch_wait_and_batch_settings(kafka_bootstrap):
    """--fetch-max-wait-ms reaches the worker's consumer (the idle-CPU versus latency knob)."""
    from ner_stream.config import WorkerConfig
    from ner_stream.kafka_io import make_consumer

    cfg = WorkerConfig(bootstrap_servers=kafka_bootstrap, fetch_max_wait_ms=250, max_batch_docs=16)
    consumer = make_consumer(cfg)
    try:
        assert consumer.config["fetch_max_wait_ms"] == 250
        assert consumer.config["max_poll_records"] == 64
    finally:
        consumer.close()
    assert WorkerConfig().fetch_max_wait_ms == 10
