"""Exactly-once delivery (`ner_stream.transactions`), step by step against the in-memory consumer
and transactional producer: no threads, the clock passed in.

What a user relies on: a read_committed reader sees each input answered exactly once, and a
committed transaction carries exactly the input offsets of what it made visible.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest
from kafka.errors import KafkaError, TopicAuthorizationFailedError

from ner_stream.config import WorkerConfig
from ner_stream.delivery import Consumed, Job, Partition
from ner_stream.kafka_io import InputConsumer, SizeLimits
from ner_stream.messages import Document, Rejection, RejectReason, Source
from ner_stream.metrics import Metrics
from ner_stream.transactions import TransactionalDelivery
from ner_stream.worker import Worker
from tests.fakes import FakeConsumer, FakeTransactionalProducer, make_tagger, wait_for

IN, OUT, DLQ = "documents", "entities", "documents.dlq"
CFG = WorkerConfig(
    input_topic=IN,
    output_topic=OUT,
    dlq_topic=DLQ,
    processing_guarantee="exactly-once",
    instance_id="test-0",
    commit_interval_ms=1000,
    metrics_port=0,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Setup:
    """A `TransactionalDelivery` over fakes, with partition 0 (and 1) of IN owned."""

    def __init__(self, partitions: int = 2, **producer_options) -> None:
        self.consumer = FakeConsumer(IN, partitions)
        for p in range(partitions):
            for _ in range(20):
                self.consumer.append(p, b"{}")
        self.consumer.subscribe([IN])
        self.consumer.poll()  # joins: every partition assigned
        self.producer = FakeTransactionalProducer(self.consumer, **producer_options)
        self.parts = {(IN, p): Partition((IN, p)) for p in range(partitions)}
        self.metrics = Metrics()
        self.clock = Clock()
        self.restarted: list[list[tuple[str, int]]] = []
        self.delivery = TransactionalDelivery(
            CFG, self.producer, InputConsumer(self.consumer), self.metrics,
            SizeLimits(1_048_576, 1_048_576), self.parts.get, self.restart, self.clock,
        )  # fmt: skip

    def restart(self, tps: list[tuple[str, int]]) -> None:
        self.restarted.append(tps)
        for tp in tps:
            if tp in self.parts:  # as the worker does: only the partitions still owned
                self.parts[tp].active = False
                self.parts[tp] = Partition(tp)

    def consume(self, partition: int, offset: int) -> Job:
        """Track the record at `offset` and return its job (not finished yet)."""
        tp = (IN, partition)
        self.delivery.track(tp, offset)
        src = Source(IN, partition, offset)
        record = Consumed(b"{}", f"k{offset}".encode(), [], 1, self.parts[tp])
        return Job(Document(f"{partition}-{offset}", "text", {}, src), None, record)

    def tick(self, now: float) -> None:
        """The consumer thread's turn at `now` (seconds)."""
        self.clock.now = now
        self.delivery.tick(now)

    def finish(self, job: Job) -> None:
        self.delivery.output(job, "model", "1")

    def reject(self, job: Job) -> None:
        self.delivery.dead_letter(
            Rejection(RejectReason.INVALID_JSON, "bad", job.doc.source), job.record
        )

    def replay(self, partition: int, end: int, prepare=lambda job: job, rounds: int = 5) -> int:
        """Read `partition` again from its committed offset up to `end` after each abort, as the
        worker does, finishing each job (`prepare` may change it first); returns the reads."""
        now = self.clock.now
        for n in range(1, rounds + 1):
            start = self.committed(partition) or 0
            for o in range(start, end):
                self.finish(prepare(self.consume(partition, o)))
            for _ in range(3):
                now += 0.6
                self.tick(now)
            if (self.committed(partition) or 0) == end or self.delivery.fatal is not None:
                return n
        return rounds

    def visible_ids(self, topic: str = OUT) -> list[str]:
        return [json.loads(s.value)["id"] for s in self.producer.visible(topic)]

    def committed(self, partition: int) -> int | None:
        return self.consumer.committed_offset(partition)


def test_outputs_become_visible_with_their_offsets_only_when_the_transaction_commits():
    s = Setup()
    jobs = [s.consume(0, o) for o in range(3)]
    for job in jobs:
        s.finish(job)
    s.tick(0.5)  # sent, inside an open transaction; not due for a commit yet
    assert len(s.producer.sent) == 3
    assert s.visible_ids() == [] and s.committed(0) is None
    s.tick(1.0)
    assert s.visible_ids() == ["0-0", "0-1", "0-2"]
    assert s.committed(0) == 3
    assert s.producer.transactions == ["committed"]
    assert s.metrics.transaction["committed"]._value.get() == 1
    assert s.metrics.transaction_seconds._sum.get() == pytest.approx(0.5)


def test_a_document_finished_early_waits_for_the_ones_before_it():
    s = Setup()
    first, second, third = (s.consume(0, o) for o in range(3))
    s.finish(third)
    s.finish(second)
    s.tick(1.0)
    # Nothing may be sent: a commit now could only cover offsets below 0.
    assert s.producer.sent == [] and s.committed(0) is None
    s.finish(first)
    s.tick(2.0)
    assert s.visible_ids() == ["0-0", "0-1", "0-2"]
    assert s.committed(0) == 3


def test_each_commit_covers_exactly_the_outputs_it_makes_visible():
    s = Setup()
    jobs = [s.consume(p, o) for o in range(6) for p in (0, 1)]
    order = [5, 0, 11, 3, 1, 2, 7, 4, 10, 6, 9, 8]  # an arbitrary finishing order
    for step, i in enumerate(order):
        s.finish(jobs[i])
        s.tick(1.0 + step)  # a commit after each
        visible = s.producer.visible(OUT)
        for p in (0, 1):
            answered = sorted(json.loads(v.value)["source"]["offset"] for v in visible
                              if json.loads(v.value)["source"]["partition"] == p)  # fmt: skip
            committed = s.committed(p) or 0
            assert answered == list(range(committed)), (step, p, answered, committed)


def test_dead_letters_are_in_the_transaction_too():
    s = Setup()
    bad, good = s.consume(0, 0), s.consume(0, 1)
    s.finish(good)
    s.reject(bad)
    s.tick(0.1)
    assert s.visible_ids(DLQ) == []
    s.tick(1.0)
    assert [x.header("ner_stream.reason") for x in s.producer.visible(DLQ)] == [b"invalid_json"]
    assert s.visible_ids() == ["0-1"] and s.committed(0) == 2


def test_a_failed_commit_aborts_and_rewinds_to_the_committed_offsets():
    s = Setup()
    for o in range(2):
        s.finish(s.consume(0, o))
    s.tick(1.0)
    assert s.committed(0) == 2
    later = [s.consume(0, o) for o in (2, 3)]
    s.finish(later[0])
    s.producer.fail_commits = 1
    s.tick(2.0)
    assert s.producer.transactions == ["committed", "aborted"]
    assert s.visible_ids() == ["0-0", "0-1"]  # the aborted output never shows
    assert s.committed(0) == 2
    assert (s.consumer._tp(0), 2) in s.consumer.seeks  # read again from the committed offset
    assert s.restarted and (IN, 0) in s.restarted[0]
    # The work in progress of the old assignment is dropped, not sent later.
    s.finish(later[1])
    s.tick(2.5)
    assert s.producer.sent[-1].value is not None and len(s.producer.sent) == 3
    assert s.metrics.transaction["aborted"]._value.get() == 1
    # Read again: each answered once in what a read_committed reader sees.
    for o in (2, 3):
        s.finish(s.consume(0, o))
    s.tick(3.0)
    assert s.visible_ids() == ["0-0", "0-1", "0-2", "0-3"]
    assert s.committed(0) == 4


def test_a_record_the_broker_refuses_is_dead_lettered_and_the_others_answered():
    """A refusal in a transaction with others only makes the record a suspect (kafka-python
    fails the batches not yet sent with the same error); read again, it is sent alone, and a
    refusal then turns its output into a dead letter."""
    s = Setup(topic_limits={OUT: 400})

    def big_at_1(job: Job) -> Job:
        if job.doc.source.offset == 1:
            job.doc = replace(job.doc, id="x" * 500)
        return job

    reads = s.replay(0, 3, big_at_1)
    assert s.delivery.fatal is None
    assert s.visible_ids() == ["0-0", "0-2"]
    letters = s.producer.visible(DLQ)
    assert [x.header("ner_stream.reason") for x in letters] == [b"output_too_large"]
    assert letters[0].header("ner_stream.source.offset") == b"1"
    assert s.committed(0) == 3
    assert s.producer.transactions.count("aborted") == 2 and reads == 3


def test_a_worker_expelled_from_the_group_cannot_commit():
    """A zombie: paused past the session timeout, the group moved on. Its offsets carry the old
    generation, which the coordinator refuses; the transaction is aborted, nothing of it shows."""
    s = Setup()
    for o in range(3):
        s.finish(s.consume(0, o))
    s.tick(0.5)
    s.consumer.expel()
    s.tick(1.0)
    assert s.producer.transactions == ["aborted"]
    assert s.visible_ids() == [] and s.committed(0) is None


def test_a_revoke_commits_what_was_sent_and_forgets_the_partition():
    s = Setup()
    done, waiting = s.consume(0, 0), s.consume(0, 1)
    other = s.consume(1, 0)
    s.finish(done)
    s.finish(other)
    s.tick(0.1)
    s.parts.pop((IN, 0)).active = False  # the worker's listener, before delivery's
    s.delivery.on_revoked([(IN, 0)])
    assert sorted(s.visible_ids()) == ["0-0", "1-0"]
    assert s.committed(0) == 1 and s.committed(1) == 1
    s.finish(waiting)  # finished after the revoke: its partition's next owner answers it
    s.tick(5.0)
    assert sorted(s.visible_ids()) == ["0-0", "1-0"]


def test_an_abort_that_fails_stops_the_worker_without_committing():
    s = Setup()
    s.finish(s.consume(0, 0))
    s.tick(0.5)
    s.producer.fence()  # another producer took the transactional id
    s.tick(1.0)
    assert isinstance(s.delivery.fatal, KafkaError)
    assert s.visible_ids() == [] and s.committed(0) is None


def test_an_output_topic_refused_by_an_acl_aborts_once_and_stops_the_worker():
    """Reading again would meet the missing ACL again, for ever: the worker stops (exit code 1)
    instead, with nothing of the transaction visible and no offset committed."""

    def refuse(topic: str, value: bytes | None) -> BaseException | None:
        return TopicAuthorizationFailedError(OUT) if topic == OUT else None

    s = Setup(fail=refuse)
    for o in range(3):
        s.finish(s.consume(0, o))
    s.tick(0.5)
    s.tick(1.0)
    assert isinstance(s.delivery.fatal, TopicAuthorizationFailedError)
    assert s.producer.transactions == ["aborted"]
    assert s.visible_ids() == [] and s.committed(0) is None


def test_shutdown_commits_what_is_finished():
    s = Setup()
    s.finish(s.consume(0, 0))
    s.consume(0, 1)  # never finished
    assert s.delivery.finish(deadline=10.0) == 1
    assert s.visible_ids() == ["0-0"] and s.committed(0) == 1


def test_a_dead_letter_too_large_for_its_topic_is_sent_smaller():
    s = Setup(topic_limits={DLQ: 9_000})

    def rejected(job: Job) -> Job:
        job.record = replace(job.record, value=b"v" * 20_000)
        s.reject(job)
        return job

    now = 0.0
    for _ in range(4):  # read again after each abort
        if s.committed(0) == 1:
            break
        rejected(s.consume(0, 0))
        for _ in range(3):
            now += 0.6
            s.tick(now)
    letters = s.producer.visible(DLQ)
    assert len(letters) == 1 and letters[0].size <= 9_000
    assert s.committed(0) == 1
    assert s.producer.transactions == ["aborted", "committed"]


def test_the_worker_end_to_end_answers_each_input_once_across_an_abort():
    consumer = FakeConsumer(IN, 2)
    producer = FakeTransactionalProducer(consumer)
    producer.fail_commits = 1
    cfg = replace(CFG, commit_interval_ms=20, max_batch_docs=8, max_batch_tokens=256,
                  max_pass_tokens=256, max_chunk_tokens=32, max_wait_ms=5,
                  shutdown_timeout_s=5.0)  # fmt: skip
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    ids = [f"d{i}" for i in range(40)]
    for i, doc_id in enumerate(ids):
        consumer.append(i % 2, json.dumps({"id": doc_id, "text": "Peter went to Paris ."}).encode())
    consumer.append(0, b"\xff not utf-8")
    worker = Worker(cfg, tagger, consumer, producer)
    stop = threading.Event()
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(worker.run(stop)), daemon=True)
    thread.start()
    wait_for(lambda: consumer.committed_offset(0) == 21 and consumer.committed_offset(1) == 20,
             timeout=20, what="everything committed")  # fmt: skip
    stop.set()
    thread.join(10)
    assert code == [0]
    assert "aborted" in producer.transactions
    seen = [json.loads(x.value)["id"] for x in producer.visible(OUT)]
    assert sorted(seen) == sorted(ids)  # each exactly once
    assert len(producer.visible(DLQ)) == 1


def test_partitions_lost_with_the_membership_abort_the_open_transaction():
    s = Setup()
    for o in range(2):
        s.finish(s.consume(0, o))
    s.tick(0.5)
    s.parts.pop((IN, 0)).active = False
    s.parts.pop((IN, 1)).active = False
    s.delivery.on_lost([(IN, 0), (IN, 1)])
    assert s.producer.transactions == ["aborted"]
    assert s.visible_ids() == [] and s.committed(0) is None


def test_no_offsets_are_committed_without_a_group_membership():
    """The broker checks a generation only when one is given: without one, a worker that left
    the group could commit over its partitions' new owner."""
    s = Setup()
    s.finish(s.consume(0, 0))
    s.tick(0.5)
    s.consumer.joined_generation = -1  # kafka-python's state once it knows it was removed
    s.tick(1.0)
    assert s.producer.transactions == ["aborted"] and s.committed(0) is None
