"""Exactly-once defects found in review, against the real broker: `ner-stream run
--processing-guarantee exactly-once` as a subprocess, its topics read with read_committed."""

from __future__ import annotations

import json
import time

import pytest
from kafka import KafkaProducer

from tests import kafka_util
from tests.integration import worker_util as wu
from tests.integration.test_worker import (  # noqa: F401 (fixtures)
    OUTPUT_TIMEOUT_S,
    _stop,
    _wait_assigned,
    start_worker,
    tiny_model,
)
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
    kafka_bootstrap, topic_factory, start_worker  # noqa: F811
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
