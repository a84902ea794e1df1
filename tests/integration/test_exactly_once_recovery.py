"""Exactly-once against the real broker where the input or the broker is unusual: an input
written in transactions (offsets taken by markers), a record the output topic refuses. `ner-stream
run --processing-guarantee exactly-once` as a subprocess, its topics read with read_committed."""

from __future__ import annotations

import json
import time

import pytest
from kafka import KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType

from tests import kafka_util
from tests.integration import worker_util as wu
from tests.integration.test_worker import OUTPUT_TIMEOUT_S, _stop, _wait_assigned
from tests.integration.worker_util import Topics

pytestmark = pytest.mark.integration

EOS = {"processing_guarantee": "exactly-once", "instance_id": "r0", "commit_interval_ms": 300}


def _topics(topic_factory, output_partitions: int = 1) -> Topics:
    return Topics(
        input=topic_factory(partitions=1, prefix="docs"),
        output=topic_factory(partitions=output_partitions, prefix="ents"),
        dlq=topic_factory(partitions=1, prefix="dlq"),
        group=kafka_util.unique_name("ner-group"),
    )


def _answers(bootstrap: str, topics: Topics, n: int, worker: wu.WorkerProcess,
             timeout_s: float) -> tuple[list[str], list[str]]:  # fmt: skip
    """Read the output and dead-letter topics (read_committed) until `n` answers came or
    `timeout_s` passed; returns (output ids, dead-letter keys)."""
    out = wu.TopicReader(bootstrap, topics.output, json_ids=True, isolation="read_committed")
    dlq = wu.TopicReader(bootstrap, topics.dlq, isolation="read_committed")
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(out.records) + len(dlq.records) < n:
            assert worker.alive(), f"the worker stopped:\n{worker.tail()}"
            out.poll()
            dlq.poll()
        return ([r.json()["id"] for r in out.records],
                [(r.key or b"").decode() for r in dlq.records])  # fmt: skip
    finally:
        out.close()
        dlq.close()


def test_an_input_written_in_transactions_is_answered_whole(
    kafka_bootstrap,
    topic_factory,
    start_worker,  # noqa: F811
):
    """The input of this worker is the output of another exactly-once application (here a
    kafka-python transactional producer, five transactions): each transaction leaves a commit
    marker at an offset that the worker's read_committed consumer never receives."""
    topics = _topics(topic_factory)
    worker = start_worker("tx-input", topics, **EOS)
    _wait_assigned(worker)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=topics.group,
                             acks="all", enable_idempotence=True)  # fmt: skip
    ids = []
    try:
        producer.init_transactions()
        for t in range(5):
            producer.begin_transaction()
            for i in range(10):
                ids.append(f"t{t}-{i}")
                value = json.dumps({"id": ids[-1], "text": "Peter went to Paris ."}).encode()
                producer.send(topics.input, key=ids[-1].encode(), value=value)
            producer.commit_transaction()
    finally:
        producer.close(timeout=10)
    seen, letters = _answers(kafka_bootstrap, topics, len(ids), worker, OUTPUT_TIMEOUT_S)
    _stop(worker)
    assert letters == []
    assert sorted(seen) == sorted(ids), f"{len(seen)} of {len(ids)} answered"


def test_a_record_the_output_topic_refuses_is_dead_lettered_and_the_stream_goes_on(
    kafka_bootstrap,
    topic_factory,
    kafka_admin,
    start_worker,  # noqa: F811
):
    """The output topic's max.message.bytes is lowered after the worker read it at start (an
    operator's change; or the worker cannot describe topic configs): the broker refuses the one
    large output. As documented ("a record the broker refuses for itself is remembered, and when
    it comes again its output becomes a dead letter"), the worker must go on: only that document
    goes to the dead-letter topic, every other one gets its output, SIGTERM exits 0.

    Seen instead (kafka-python 3.0.12, Kafka 4): the transaction after the abort fails with
    OutOfOrderSequenceNumberError, the producer bumps its epoch, abort_transaction raises
    "Invalid transition ... BUMPING_PRODUCER_EPOCH to ABORTING_TRANSACTION", the worker stops
    with exit code 1 (and spends 2 x 30 s flushing on the way out). With a limit below the
    producer's batch size, the small outputs aborted with the large one are dead-lettered too.

    The limit stays above the producer's batch size (64 KiB), so that batches of small outputs
    fit and only the large record is refused."""
    topics = _topics(topic_factory)
    worker = start_worker("refused", topics, **EOS)
    _wait_assigned(worker)
    resource = ConfigResource(ConfigResourceType.TOPIC, topics.output,
                              {"max.message.bytes": "80000"})  # fmt: skip
    kafka_admin.alter_configs([resource])
    time.sleep(2)  # the broker applies topic configs asynchronously
    records, ids = [], []
    for i in range(121):
        doc_id = "big" if i == 60 else f"s{i}"
        value = {"id": doc_id, "text": "Peter went to Paris ."}
        if doc_id == "big":
            value["blob"] = "b" * 100_000  # carried to the output as meta: over 80000 bytes
        ids.append(doc_id)
        records.append((doc_id.encode(), json.dumps(value).encode(), []))
    wu.produce_records(kafka_bootstrap, topics.input, records)
    seen, letters = _answers(kafka_bootstrap, topics, len(ids), worker, OUTPUT_TIMEOUT_S)
    _stop(worker)
    assert letters == ["big"], f"{len(letters)} dead letters: {letters[:10]}"
    assert sorted(seen) == sorted(i for i in ids if i != "big")
