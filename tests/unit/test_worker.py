"""The Kafka loop end to end, against in-memory stand-ins for the consumer and the producer.

Each test runs `Worker.run` on a background thread, waits (with a deadline) for the outputs it
expects, then stops the worker and checks its exit code, what reached the topics and what was
committed. The tagger is the rigged tiny model of `tests.fakes`: "Peter" is a person and "Paris"
a location, everything else is outside any entity.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kafka.errors import (
    GroupAuthorizationFailedError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
)

from ner_stream.checkpoint import save
from ner_stream.config import WorkerConfig
from ner_stream.model_process import (
    CRASH_WORD_ENV,
    HANG_WORD_ENV,
    ModelProcess,
    ModelProcessError,
    RestartWindow,
)
from ner_stream.tagger import Tagger, TaggerOptions
from ner_stream.worker import Worker
from tests.fakes import FakeConsumer, FakeProducer, make_tagger, rigged_model, wait_for

IN, OUT, DLQ = "documents", "entities", "documents.dlq"

CFG = WorkerConfig(
    input_topic=IN,
    output_topic=OUT,
    dlq_topic=DLQ,
    max_batch_docs=8,
    max_batch_tokens=256,
    max_pass_tokens=256,
    max_chunk_tokens=32,
    max_wait_ms=5,
    commit_interval_ms=10,
    queue_docs=64,
    shutdown_timeout_s=5.0,
    metrics_port=0,
)


@pytest.fixture(scope="module")
def tagger() -> Tagger:
    return make_tagger("rigged", max_chunk_tokens=CFG.max_chunk_tokens,
                       max_pass_tokens=CFG.max_pass_tokens)  # fmt: skip


class Running:
    """A worker running on a background thread."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.stop_event = threading.Event()
        self.code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="worker-under-test", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.code = self.worker.run(self.stop_event)
        except BaseException as e:  # reported by stop()
            self.error = e

    def stop(self, timeout: float = 10.0) -> int:
        """Set stop, join, and return the exit code (fails the test if run() raised or hung)."""
        self.stop_event.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "Worker.run did not return"
        if self.error is not None:
            raise AssertionError(f"Worker.run raised {self.error!r}") from self.error
        assert self.code is not None
        return self.code


def start(
    tagger: Tagger,
    consumer: FakeConsumer,
    producer: FakeProducer,
    **overrides: Any,
) -> Running:
    cfg = replace(CFG, **overrides)
    return Running(Worker(cfg, tagger, consumer, producer))


def doc(doc_id: str, text: str, **extra: Any) -> bytes:
    return json.dumps({"id": doc_id, "text": text, **extra}).encode()


def outputs(producer: FakeProducer) -> list[dict]:
    return [s.json() for s in producer.delivered(OUT)]


def output_ids(producer: FakeProducer) -> set[str]:
    return {o["id"] for o in outputs(producer)}


def assert_contract(out: dict, text: str) -> None:
    assert set(out) >= {"id", "source", "model", "entities"}
    assert out["model"] == {"name": "rigged", "version": "0.0.1"}
    for e in out["entities"]:
        assert 0 <= e["start"] < e["end"] <= len(text)
        assert e["text"] == text[e["start"] : e["end"]]
        assert e["type"] in ("PER", "LOC")
        assert 0.0 <= e["score"] <= 1.0


def committed_all(consumer: FakeConsumer) -> bool:
    return all(
        consumer.committed_offset(p) == consumer.end_offset(p)
        for p in range(len(consumer.logs))
        if consumer.end_offset(p)
    )


# ---------------------------------------------------------------------------------------- tests


def test_every_document_gets_one_output_keyed_like_its_input(tagger):
    consumer, producer = FakeConsumer(partitions=2), FakeProducer()
    texts = {}
    for i in range(30):
        text = f"Peter went to Paris number {i} ." if i % 3 else f"nothing here {i}"
        texts[f"d{i}"] = text
        consumer.append(
            i % 2,
            doc(f"d{i}", text, lang="en"),
            key=f"k{i}".encode(),
            headers=[("trace", f"t{i}".encode())],
        )
    running = start(tagger, consumer, producer)
    wait_for(lambda: len(producer.delivered(OUT)) >= 30, what="30 outputs")
    wait_for(lambda: committed_all(consumer), what="commits of every offset")
    assert running.stop() == 0

    sent = producer.delivered(OUT)
    assert len(sent) == 30
    assert sorted(s.json()["id"] for s in sent) == sorted(texts)
    for s in sent:
        out = s.json()
        i = int(out["id"][1:])
        assert s.key == f"k{i}".encode()
        assert s.header("trace") == f"t{i}".encode()
        assert out["source"] == {"topic": IN, "partition": i % 2, "offset": i // 2}
        assert out["meta"] == {"lang": "en"}
        assert_contract(out, texts[out["id"]])
        expected = [("Peter", "PER"), ("Paris", "LOC")] if i % 3 else []
        assert [(e["text"], e["type"]) for e in out["entities"]] == expected
    assert producer.delivered(DLQ) == []
    # Per partition, outputs leave in input order (one tagging thread, batches in order).
    for p in (0, 1):
        offsets = [
            s.json()["source"]["offset"] for s in sent if s.json()["source"]["partition"] == p
        ]
        assert offsets == sorted(offsets)
    assert consumer.committed_offset(0) == 15 and consumer.committed_offset(1) == 15
    assert consumer.closed and consumer.close_autocommit is False
    value = running.worker.metrics.registry.get_sample_value
    assert value("ner_stream_documents_total", {"outcome": "ok"}) == 30
    assert value("ner_stream_entities_total", {"type": "PER"}) == 20
    assert running.worker.health.model_loaded and running.worker.health.assigned == 2


BAD_INPUTS = [
    (b"\xff\xfe not utf-8", "invalid_utf8"),
    (b'["a", "json", "array"]', "not_an_object"),
    (b'{"id": "x"}', "missing_text"),
    (b'{"id": "y", "text": 42}', "text_not_string"),
    (b'{"id": "z", "text": "' + b"a" * 300 + b'"}', "too_large"),
    (b'{"id": "broken", "text": ', "invalid_json"),
]


def test_invalid_inputs_become_dead_letters_and_the_stream_goes_on(tagger):
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    consumer.append(0, doc("before", "Peter ."), key=b"kb")
    for n, (value, _) in enumerate(BAD_INPUTS):
        consumer.append(0, value, key=f"bad{n}".encode(), headers=[("h", b"v")])
    consumer.append(0, doc("empty", ""), key=b"ke")
    consumer.append(0, doc("after", "to Paris ."), key=b"ka")
    running = start(tagger, consumer, producer, max_doc_bytes=200)
    wait_for(lambda: len(producer.delivered(DLQ)) == len(BAD_INPUTS), what="dead letters")
    wait_for(lambda: output_ids(producer) == {"before", "empty", "after"}, what="outputs")
    wait_for(lambda: committed_all(consumer), what="commit past the dead letters")
    assert running.stop() == 0

    dead = producer.delivered(DLQ)
    for n, (s, (value, reason)) in enumerate(zip(dead, BAD_INPUTS, strict=True)):
        assert s.value == value  # the original bytes, untouched
        assert s.key == f"bad{n}".encode()
        assert s.header("h") == b"v"
        assert s.header("ner_stream.reason") == reason.encode()
        assert s.header("ner_stream.source.topic") == IN.encode()
        assert s.header("ner_stream.source.partition") == b"0"
        assert s.header("ner_stream.source.offset") == str(n + 1).encode()
        assert s.header("ner_stream.detail")
    by_id = {o["id"]: o for o in outputs(producer)}
    assert by_id["empty"]["entities"] == []
    assert [e["text"] for e in by_id["before"]["entities"]] == ["Peter"]
    assert [e["text"] for e in by_id["after"]["entities"]] == ["Paris"]
    assert consumer.committed_offset(0) == len(BAD_INPUTS) + 3
    value = running.worker.metrics.registry.get_sample_value
    assert value("ner_stream_documents_total", {"outcome": "dead_letter"}) == len(BAD_INPUTS)
    for _, reason in BAD_INPUTS:
        assert value("ner_stream_dead_letters_total", {"reason": reason}) == 1


def test_commits_never_pass_an_unacknowledged_output(tagger):
    consumer, producer = FakeConsumer(partitions=2), FakeProducer(hold=True)
    for i in range(10):
        consumer.append(i % 2, doc(f"d{i}", "Peter went to Paris ."))
    running = start(tagger, consumer, producer)
    wait_for(lambda: producer.pending() == 10, what="10 outputs sent (held)")
    time.sleep(0.05)  # several commit intervals pass with nothing acknowledged
    assert consumer.commits == []

    # Acknowledge the first 3 sends: whatever they cover may be committed, nothing beyond.
    first = producer.sent[:3]
    producer.release(3)
    acked: dict[int, set[int]] = {0: set(), 1: set()}
    for s in first:
        src = s.json()["source"]
        acked[src["partition"]].add(src["offset"])

    def contiguous(p: int) -> int:
        n = 0
        while n in acked[p]:
            n += 1
        return n

    if any(contiguous(p) for p in (0, 1)):
        wait_for(lambda: consumer.commits, what="a commit of the acknowledged prefix")
    time.sleep(0.05)
    for commit in consumer.commits:
        for tp, om in commit.items():
            assert om.offset <= contiguous(tp.partition), (commit, acked)

    producer.release()
    wait_for(lambda: committed_all(consumer), what="commits after release")
    assert running.stop() == 0
    assert consumer.committed_offset(0) == 5 and consumer.committed_offset(1) == 5
    # Commits of a partition never go backwards.
    for p in (0, 1):
        seq = [om.offset for c in consumer.commits for tp, om in c.items() if tp.partition == p]
        assert seq == sorted(seq)


def test_a_failed_output_becomes_a_dead_letter_and_the_offset_advances(tagger):
    def fail(topic: str, value: bytes | None) -> BaseException | None:
        if topic == OUT and value and b'"id":"huge"' in value:
            return MessageSizeTooLargeError("too large for the topic")
        return None

    consumer, producer = FakeConsumer(partitions=1), FakeProducer(fail=fail)
    consumer.append(0, doc("a", "Peter ."), key=b"ka")
    consumer.append(0, doc("huge", "Paris ."), key=b"kh", headers=[("h", b"1")])
    consumer.append(0, doc("b", "Peter ."), key=b"kb")
    running = start(tagger, consumer, producer)
    wait_for(lambda: len(producer.delivered(DLQ)) == 1, what="the dead letter")
    wait_for(lambda: consumer.committed_offset(0) == 3, what="commit past the failed output")
    assert running.stop() == 0

    assert output_ids(producer) == {"a", "b"}
    dead = producer.delivered(DLQ)[0]
    assert dead.value == doc("huge", "Paris .")  # the input, not the output that failed
    assert dead.key == b"kh"
    assert dead.header("h") == b"1"
    assert dead.header("ner_stream.reason") == b"output_too_large"
    assert b"MessageSizeTooLargeError" in dead.header("ner_stream.detail")
    assert dead.header("ner_stream.source.offset") == b"1"


def test_a_failed_dead_letter_is_fatal_and_not_committed(tagger):
    def fail(topic: str, value: bytes | None) -> BaseException | None:
        return KafkaTimeoutError("dlq unavailable") if topic == DLQ else None

    consumer, producer = FakeConsumer(partitions=1), FakeProducer(fail=fail)
    consumer.append(0, doc("a", "Peter ."))
    consumer.append(0, doc("b", "Paris ."))
    consumer.append(0, b"\xff not utf-8")  # offset 2: its dead letter fails
    consumer.append(0, doc("c", "Peter ."))
    running = start(tagger, consumer, producer)
    running.thread.join(10)
    assert not running.thread.is_alive(), "the worker should stop by itself"
    assert running.stop() == 1
    assert consumer.committed_offset(0) in (None, 1, 2)
    assert all(om.offset <= 2 for c in consumer.commits for om in c.values())
    assert consumer.closed


def test_an_output_topic_refused_by_an_acl_stops_the_worker_with_one_clear_line(tagger, caplog):
    def refuse(topic: str, value: bytes | None) -> BaseException | None:
        return TopicAuthorizationFailedError(OUT) if topic == OUT else None

    consumer, producer = FakeConsumer(partitions=1), FakeProducer(fail=refuse)
    for i in range(20):
        consumer.append(0, doc(f"d{i}", "Peter ."))
    running = start(tagger, consumer, producer)
    running.thread.join(10)
    assert not running.thread.is_alive(), "the worker should stop by itself"
    assert running.stop() == 1
    assert consumer.commits == []  # nothing was written, so nothing is committed
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # One line for the first refused record (not one per record in flight), one to say why the
    # worker stopped and what to change.
    assert len(errors) == 2, [r.getMessage() for r in errors]
    assert errors[-1].getMessage() == (
        "stopped on a fatal error: Kafka at 127.0.0.1:9092 refused this worker's principal WRITE "
        f"on the output topic {OUT!r}: add the missing ACL"
    )


class RefusingConsumer(FakeConsumer):
    """The consumer of a principal without READ on its group: kafka-python raises from poll."""

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        raise GroupAuthorizationFailedError(CFG.group_id)


def test_a_consumer_group_refused_by_an_acl_stops_the_worker_without_a_traceback(tagger, caplog):
    consumer, producer = RefusingConsumer(partitions=1), FakeProducer()
    consumer.append(0, doc("a", "Peter ."))
    running = start(tagger, consumer, producer)
    running.thread.join(10)
    assert not running.thread.is_alive(), "the worker should stop by itself"
    assert running.stop() == 1  # returned, not raised
    assert consumer.commits == [] and producer.sent == []
    assert caplog.records[-1].getMessage() == (
        "stopped on a fatal error: Kafka at 127.0.0.1:9092 refused this worker's principal READ "
        f"on the consumer group {CFG.group_id!r}: add the missing ACL"
    )


def test_backpressure_pauses_and_resumes_and_loses_nothing(monkeypatch):
    slow = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    original = slow.submit

    def tag_slowly(items):
        time.sleep(0.01)
        return original(items)

    monkeypatch.setattr(slow, "submit", tag_slowly)
    consumer, producer = FakeConsumer(partitions=2), FakeProducer()
    n = 60
    for i in range(n):
        consumer.append(i % 2, doc(f"d{i}", f"Peter {i} ."))
    running = start(slow, consumer, producer, queue_docs=2, max_batch_docs=2)
    most_waiting = 0

    def done() -> bool:
        nonlocal most_waiting
        most_waiting = max(most_waiting, len(running.worker.overflow))
        return len(producer.delivered(OUT)) >= n

    wait_for(done, timeout=20, what="all outputs")
    wait_for(lambda: committed_all(consumer), what="final commits")
    pauses, resumes = list(consumer.pause_calls), list(consumer.resume_calls)
    assert running.stop() == 0

    assert pauses, "the consumer was never paused while running"
    assert resumes, "the consumer was never resumed"
    # Backpressure pauses every owned partition ...
    assert any(set(call) == set(consumer.logs) for call in pauses)
    # ... so that what is read ahead of the tagger stays bounded (one poll's worth, 8 records).
    assert most_waiting <= 8
    assert output_ids(producer) == {f"d{i}" for i in range(n)}
    assert len(producer.delivered(OUT)) == n


@pytest.mark.parametrize("keep_positions", [False, True], ids=["kafka-python-2", "kafka-python-3"])
def test_a_rebalance_mid_stream_loses_nothing(tagger, keep_positions):
    consumer = FakeConsumer(partitions=2, keep_positions=keep_positions)
    producer = FakeProducer()
    ids = set()
    running = start(tagger, consumer, producer)
    for i in range(20):
        consumer.append(i % 2, doc(f"a{i}", "Peter went to Paris ."))
        ids.add(f"a{i}")
    wait_for(lambda: len(output_ids(producer)) >= 5, what="some outputs")
    consumer.rebalance()  # revoke both, assign both again
    for i in range(20):
        consumer.append(i % 2, doc(f"b{i}", "Paris ."))
        ids.add(f"b{i}")
    consumer.rebalance(revoke=[0, 1], assign=[1])  # partition 0 moves away ...
    consumer.rebalance(revoke=[], assign=[0, 1])  # ... and comes back
    wait_for(lambda: output_ids(producer) >= ids, what="an output for every id")
    wait_for(lambda: committed_all(consumer), what="commits covering everything")
    assert running.stop() == 0
    assert output_ids(producer) == ids  # duplicates are allowed, losses are not
    assert consumer.committed_offset(0) == 20 and consumer.committed_offset(1) == 20


def test_a_revoke_commits_the_delivered_work_before_giving_the_partition_up(tagger):
    consumer, producer = FakeConsumer(partitions=2), FakeProducer(hold=True)
    for i in range(8):
        consumer.append(i % 2, doc(f"d{i}", "Peter ."))
    running = start(tagger, consumer, producer)
    wait_for(lambda: producer.pending() == 8, what="8 held outputs")
    assert consumer.commits == []
    producer.hold = False  # the revoke's flush can now deliver
    consumer.rebalance(revoke=[0, 1], assign=[1])
    wait_for(lambda: consumer.assignment() == {(IN, 1)}, what="partition 0 to go")
    # The commit of partition 0 happened inside on_partitions_revoked, before the assignment.
    assert consumer.committed_offset(0) == 4
    wait_for(lambda: consumer.committed_offset(1) == 4, what="partition 1 committed")
    assert running.stop() == 0


def test_a_late_acknowledgement_from_before_a_rebalance_is_harmless(tagger):
    """Outputs sent before a revoke but acknowledged after the reassignment (their flush timed
    out) must not break the offset bookkeeping of the new assignment."""
    consumer, producer = FakeConsumer(partitions=1), FakeProducer(hold=True)
    for i in range(6):
        consumer.append(0, doc(f"d{i}", "Peter ."))
    running = start(tagger, consumer, producer)
    wait_for(lambda: producer.pending() == 6, what="6 held outputs")
    # The partition is revoked and assigned again; only offsets 0 and 1 are read again for now.
    consumer.limit(0, 2)
    consumer.rebalance()
    wait_for(lambda: producer.pending() == 8, what="2 more outputs after the reassignment")
    producer.hold = False
    producer.release()  # acks of the old sends of offsets 2..5 arrive: never re-tracked yet
    time.sleep(0.05)
    assert running.thread.is_alive(), f"the worker died: {running.error!r}"
    consumer.limit(0, None)
    wait_for(lambda: consumer.committed_offset(0) == 6, what="commit of everything")
    assert running.stop() == 0
    assert output_ids(producer) == {f"d{i}" for i in range(6)}


def test_stop_finishes_queued_work_flushes_and_commits(monkeypatch):
    slow = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    original = slow.submit
    started, gate = threading.Event(), threading.Event()

    def tag_slowly(items):
        started.set()
        gate.wait(5)
        time.sleep(0.01)
        return original(items)

    monkeypatch.setattr(slow, "submit", tag_slowly)
    consumer, producer = FakeConsumer(partitions=1), FakeProducer(hold=True)
    for i in range(12):
        consumer.append(0, doc(f"d{i}", "Peter ."))
    running = start(slow, consumer, producer, max_batch_docs=2, shutdown_timeout_s=3.0)
    wait_for(started.is_set, what="tagging to start")
    wait_for(lambda: consumer.positions.get((IN, 0)) == 12, what="all 12 consumed")
    assert producer.sent == []  # the first batch is still in the model
    # Stop while every document is still queued or in the model; acks stay held until the
    # shutdown's flush delivers them.
    t0 = time.monotonic()
    running.stop_event.set()
    time.sleep(0.02)
    producer.hold = False
    gate.set()
    code = running.stop()
    assert code == 0
    assert time.monotonic() - t0 < 3.0
    assert output_ids(producer) == {f"d{i}" for i in range(12)}
    assert producer.flushes >= 1
    assert consumer.committed_offset(0) == 12
    assert producer.closed and consumer.closed


def test_a_long_document_is_tagged_whole_and_the_small_ones_behind_it_too():
    # 40 sentences of 9 tokens and one of 30 (more than half the batch: it goes the "long lane"),
    # far more than max_batch_tokens (48 real tokens per micro-batch) in all.
    sentence = "Peter went to Paris and the Peter went ."
    long_text = " ".join([sentence] * 40) + " " + " ".join(["Paris"] * 29) + " ."
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    consumer.append(0, doc("long", long_text))
    for i in range(10):
        consumer.append(0, doc(f"s{i}", "Paris ."))
    small = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=48)
    running = start(small, consumer, producer, max_batch_tokens=48, max_pass_tokens=48,
                    max_chunk_tokens=32)  # fmt: skip
    wait_for(lambda: output_ids(producer) == {"long"} | {f"s{i}" for i in range(10)},
             what="all outputs")  # fmt: skip
    assert running.stop() == 0

    out = next(o for o in outputs(producer) if o["id"] == "long")
    assert_contract(out, long_text)
    ents = out["entities"]
    assert [e["start"] for e in ents] == sorted(e["start"] for e in ents)  # document order
    assert sum(e["text"] == "Peter" for e in ents) == 80
    assert sum(e["text"] == "Paris" for e in ents) == 40 + 29
    # The spans cover the whole text: the last entity is in the final sentence.
    assert ents[-1]["end"] == len(long_text) - 2
    assert consumer.committed_offset(0) == 11


class DyingRunner:
    """A stand-in for a model process that dies after its first pass, again after each restart.

    Its passes after the first are lost as with a dead child: `ready()`, then `get()` raises.
    """

    def __init__(self, tagger: Tagger) -> None:
        self.tagger = tagger
        self.passes = 0
        self.restarts = 0

    def __call__(self, batches, rows):
        self.passes += 1
        if self.passes == 1:
            return self.tagger.local(batches, rows)

        class Lost:
            def ready(self) -> bool:
                return True

            def get(self):
                raise ModelProcessError("the model process stopped (exit code -9)")

        return Lost()

    def restart(self) -> None:
        self.restarts += 1


@pytest.mark.parametrize("restartable", [False, True], ids=["no-restart", "restarted"])
def test_a_model_process_that_dies_on_any_input_stops_the_worker_without_dead_letters(
    restartable,
):
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    runner = DyingRunner(tagger)
    tagger.use_runner(runner)
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    for i in range(20):
        consumer.append(0, doc(f"d{i}", "Peter went to Paris ."))
    worker = Worker(replace(CFG, max_batch_docs=4), tagger, consumer, producer,
                    restart_model=runner.restart if restartable else None)  # fmt: skip
    running = Running(worker)
    running.thread.join(10)
    assert not running.thread.is_alive(), "the worker should stop by itself"
    assert running.stop() == 1
    # Restarted, the model died again on the first document alone and then on a one-word probe:
    # the model is at fault, not the documents, so none is dead-lettered.
    assert producer.delivered(DLQ) == []
    assert runner.restarts == (2 if restartable else 0)
    restarts = worker.metrics.registry.get_sample_value("ner_stream_model_restarts_total")
    assert restarts == runner.restarts
    if restartable:
        assert "dies on any input" in str(worker.fatal)
    tagged = len(producer.delivered(OUT))
    assert 1 <= tagged < 20
    assert all(om.offset <= tagged for c in consumer.commits for om in c.values())


def test_a_model_process_that_cannot_start_again_stops_the_worker(caplog):
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    runner = DyingRunner(tagger)
    tagger.use_runner(runner)

    def restart() -> None:
        raise ModelProcessError("the model process could not load the model: broken file")

    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    for i in range(8):
        consumer.append(0, doc(f"d{i}", "Peter ."))
    worker = Worker(replace(CFG, max_batch_docs=4), tagger, consumer, producer,
                    restart_model=restart)  # fmt: skip
    running = Running(worker)
    running.thread.join(10)
    assert not running.thread.is_alive(), "the worker should stop by itself"
    assert running.stop() == 1
    assert "the model process could not be started again: the model process could not load" in (
        caplog.text
    )
    assert producer.delivered(DLQ) == []
    assert worker.metrics.registry.get_sample_value("ner_stream_model_restarts_total") == 0
    assert all(om.offset <= 4 for c in consumer.commits for om in c.values())


class KillableRunner:
    """A stand-in for a model process whose passes wait in it until `kill`, which loses them all
    (as a dead child does); after `restart` each pass is answered at once."""

    def __init__(self, tagger: Tagger) -> None:
        self.tagger = tagger
        self.held: list[int] = []  # rows of each pass sent before the kill
        self.after: list[int] = []  # rows of each pass sent after the restart
        self.killed = threading.Event()
        self.restarts = 0

    def __call__(self, batches, rows):
        if self.restarts:
            self.after.append(sum(rows))
            return self.tagger.local(batches, rows)
        self.held.append(sum(rows))
        killed = self.killed

        class Held:
            def ready(self) -> bool:
                return killed.is_set()

            def get(self):
                killed.wait(10)
                raise ModelProcessError("the model process stopped (exit code -9)")

        return Held()

    def restart(self) -> None:
        self.restarts += 1


def test_every_pass_in_the_model_when_it_dies_is_retried_one_document_at_a_time():
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    runner = KillableRunner(tagger)
    tagger.use_runner(runner)
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    for i in range(8):
        consumer.append(0, doc(f"d{i}", "Peter went to Paris ."))
    worker = Worker(replace(CFG, max_batch_docs=4), tagger, consumer, producer,
                    restart_model=runner.restart)  # fmt: skip
    running = Running(worker)
    wait_for(lambda: len(runner.held) == 2, what="two passes in the model")
    lost = sum(runner.held)
    assert producer.sent == []
    runner.killed.set()
    wait_for(lambda: output_ids(producer) == {f"d{i}" for i in range(8)}, what="all outputs")
    wait_for(lambda: committed_all(consumer), what="commits of every offset")
    assert running.stop() == 0
    assert runner.restarts == 1
    assert runner.after[:lost] == [1] * lost  # both passes' documents, each alone
    assert len(producer.delivered(OUT)) == 8
    assert producer.delivered(DLQ) == []


# -------------------------------------------------------------- a real model process that dies

PROCESS_OPTIONS = TaggerOptions(device="cpu", max_chunk_tokens=32, max_pass_tokens=256)
MARKED = "Peter and Paris ."  # "and": the word that kills the model process (CRASH_WORD_ENV)


@pytest.fixture(scope="module")
def rigged_file(tmp_path_factory) -> Path:
    loaded = rigged_model()
    path = tmp_path_factory.mktemp("model") / "rigged.nerm"
    save(path, loaded.model, loaded.info)
    return path


@pytest.fixture
def model_process(rigged_file, monkeypatch) -> Iterator[ModelProcess]:
    """A model process (as `ner-stream run` starts it) whose child dies on the word "and"."""
    monkeypatch.setenv(CRASH_WORD_ENV, "and")
    proc = ModelProcess(rigged_file, "fp32", threads=1)
    yield proc
    proc.close()


def start_with(proc: ModelProcess, consumer, producer, restarts=None, **overrides) -> Running:
    tagger = Tagger.from_file(proc._spec["model"], PROCESS_OPTIONS)
    tagger.use_runner(proc)
    cfg = replace(CFG, **overrides)
    return Running(Worker(cfg, tagger, consumer, producer, restart_model=proc.restart,
                          restarts=restarts))  # fmt: skip


def offsets_of(sent) -> list[int]:
    return [int(s.header("ner_stream.source.offset")) if s.topic == DLQ
            else s.json()["source"]["offset"] for s in sent]  # fmt: skip


def run_with_a_marked_document(proc: ModelProcess, n: int, marked: int) -> tuple:
    """`n` documents through a worker on `proc`, the one at offset `marked` MARKED, until each
    has an output or a dead letter and every offset is committed; the others' outputs are
    checked. Returns the stopped worker (exit 0), its producer and its consumer."""
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    for i in range(n):
        consumer.append(0, doc(f"d{i}", MARKED if i == marked else "Peter went to Paris ."))
    running = start_with(proc, consumer, producer, max_batch_docs=4)
    wait_for(lambda: len(producer.delivered(OUT)) + len(producer.delivered(DLQ)) >= n,
             timeout=90, what="an output or a dead letter for each document")  # fmt: skip
    wait_for(lambda: committed_all(consumer), timeout=10, what="commits of every offset")
    assert running.thread.is_alive() and running.worker.fatal is None
    assert running.stop() == 0
    assert sorted(offsets_of(producer.delivered(OUT))) == [i for i in range(n) if i != marked]
    for out in outputs(producer):
        assert [e["text"] for e in out["entities"]] == ["Peter", "Paris"]
    assert consumer.committed_offset(0) == n
    return running.worker, producer, consumer


def test_a_document_that_kills_the_model_process_is_dead_lettered_and_the_rest_go_on(
    model_process,
):
    worker, producer, _ = run_with_a_marked_document(model_process, 12, marked=5)
    (dead,) = producer.delivered(DLQ)
    assert dead.value == doc("d5", MARKED)
    assert dead.header("ner_stream.reason") == b"model_crash"
    assert dead.header("ner_stream.source.offset") == b"5"
    assert b"exit code -9" in dead.header("ner_stream.detail")
    value = worker.metrics.registry.get_sample_value
    # Once with the document in a batch, once with it alone.
    assert value("ner_stream_model_restarts_total") == 2
    assert value("ner_stream_dead_letters_total", {"reason": "model_crash"}) == 1


def test_a_model_process_killed_once_loses_nothing(model_process, monkeypatch):
    monkeypatch.delenv(CRASH_WORD_ENV)  # the restarted child survives the marked document
    consumer, producer = FakeConsumer(partitions=2), FakeProducer()
    for i in range(12):
        consumer.append(i % 2, doc(f"d{i}", MARKED if i == 4 else "Peter went to Paris ."))
    running = start_with(model_process, consumer, producer, max_batch_docs=3)
    wait_for(lambda: output_ids(producer) == {f"d{i}" for i in range(12)}, timeout=90,
             what="all outputs")  # fmt: skip
    # Then killed from outside while idle: the next batch finds it dead.
    pid = model_process.pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: model_process.pid != pid or model_process._process.poll() is not None,
             what="the child to die")  # fmt: skip
    for i in range(12, 16):
        consumer.append(i % 2, doc(f"d{i}", "Paris ."))
    wait_for(lambda: output_ids(producer) == {f"d{i}" for i in range(16)}, timeout=90,
             what="the outputs after the second death")  # fmt: skip
    wait_for(lambda: committed_all(consumer), timeout=10, what="commits of every offset")
    assert running.stop() == 0

    assert producer.delivered(DLQ) == []
    assert len(producer.delivered(OUT)) == 16  # each exactly once
    marked = next(o for o in outputs(producer) if o["id"] == "d4")
    assert [e["text"] for e in marked["entities"]] == ["Peter", "Paris"]
    value = running.worker.metrics.registry.get_sample_value
    assert value("ner_stream_model_restarts_total") == 2


def test_model_process_deaths_beyond_the_restart_window_stop_the_worker(model_process):
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    for i in range(10):
        consumer.append(0, doc(f"d{i}", MARKED if i in (4, 7) else "Peter went to Paris ."))
    # One restart allowed a minute: the marked document's second death is one too many.
    window = RestartWindow(limit=1, window_s=60.0)
    running = start_with(model_process, consumer, producer, restarts=window, max_batch_docs=3)
    running.thread.join(90)
    assert not running.thread.is_alive(), "the worker should stop by itself"
    assert running.stop() == 1
    assert "died more than 1 times in 60 s" in str(running.worker.fatal)
    assert running.worker.metrics.registry.get_sample_value("ner_stream_model_restarts_total") == 1
    produced = set(offsets_of(producer.delivered(OUT)) + offsets_of(producer.delivered(DLQ)))
    assert 4 not in produced
    # Nothing committed past a document without its output or dead letter.
    first_missing = min(set(range(10)) - produced)
    assert first_missing <= 4
    assert all(om.offset <= first_missing for c in consumer.commits for om in c.values())


class HeldRunner:
    """A model runner whose passes finish only when released; records the rows of each pass."""

    def __init__(self, tagger: Tagger) -> None:
        self.tagger = tagger
        self.rows: list[int] = []
        self.release = threading.Event()

    def __call__(self, batches, rows):
        done = self.tagger.local(batches, rows)
        self.rows.append(sum(rows))
        release = self.release

        class Held:
            def ready(self) -> bool:
                return release.is_set()

            def get(self):
                release.wait(10)
                return done

        return Held()


def test_while_the_model_is_busy_a_batch_waits_until_full():
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    runner = HeldRunner(tagger)
    tagger.use_runner(runner)
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    consumer.append(0, doc("d0", "Peter ."))
    running = start(tagger, consumer, producer, max_batch_docs=4, max_wait_ms=1)
    wait_for(lambda: runner.rows == [1], what="the first document in the model")
    for i in range(1, 7):
        consumer.append(0, doc(f"d{i}", "Peter ."))
    wait_for(lambda: consumer.positions.get((IN, 0)) == 7, what="all 7 consumed")
    wait_for(lambda: runner.rows == [1, 4], what="a full batch queued behind the first")
    time.sleep(0.1)  # a hundred wait limits pass: the last two documents still wait
    assert runner.rows == [1, 4]
    assert producer.sent == []
    runner.release.set()
    wait_for(lambda: len(producer.delivered(OUT)) == 7, what="all outputs")
    assert runner.rows == [1, 4, 2]
    assert running.stop() == 0
    assert output_ids(producer) == {f"d{i}" for i in range(7)}


@pytest.mark.parametrize(("growth", "third"), [(2, 8), (1, 4)])
def test_while_the_model_holds_two_batches_the_next_grows_by_max_batch_growth(growth, third):
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    runner = HeldRunner(tagger)
    tagger.use_runner(runner)
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    consumer.append(0, doc("d0", "Peter ."))
    running = start(tagger, consumer, producer, max_batch_docs=4, max_wait_ms=1,
                    max_batch_growth=growth)  # fmt: skip
    wait_for(lambda: runner.rows == [1], what="the first document in the model")
    for i in range(1, 13):
        consumer.append(0, doc(f"d{i}", "Peter ."))
    wait_for(lambda: len(runner.rows) >= 3, what="a third batch")
    assert runner.rows[:3] == [1, 4, third]
    runner.release.set()
    wait_for(lambda: len(producer.delivered(OUT)) == 13, what="all outputs")
    assert running.stop() == 0
    assert output_ids(producer) == {f"d{i}" for i in range(13)}


def test_the_lag_gauge_counts_the_records_not_yet_consumed(tagger):
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    for i in range(10):
        consumer.append(0, doc(f"d{i}", "Peter ."))
    consumer.limit(0, 4)  # the fetches stop at offset 4: six records behind
    running = start(tagger, consumer, producer)
    value = running.worker.metrics.registry.get_sample_value
    labels = {"topic": IN, "partition": "0"}
    wait_for(lambda: len(producer.delivered(OUT)) == 4, what="the first four outputs")
    wait_for(lambda: value("ner_stream_consumer_lag", labels) == 6, what="a lag of 6")
    assert running.stop() == 0


def test_work_waiting_for_room_is_dropped_when_its_partition_is_revoked():
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    runner = HeldRunner(tagger)
    tagger.use_runner(runner)
    consumer, producer = FakeConsumer(partitions=2), FakeProducer()
    for i in range(40):
        consumer.append(0, doc(f"d{i}", "Peter ."))
    running = start(tagger, consumer, producer, queue_docs=2, max_batch_docs=1)
    depth = running.worker.metrics.registry.get_sample_value
    # Three passes submitted: the tagging thread waits for the oldest, and takes no more work.
    wait_for(lambda: len(runner.rows) == 3, what="three passes in the model")
    wait_for(lambda: (depth("ner_stream_queue_depth") or 0) > 2, what="documents waiting for room")
    consumer.rebalance(revoke=[0], assign=[1])  # partition 0 goes to another worker
    # Only what already sits in the work queue (two documents) may remain.
    wait_for(lambda: depth("ner_stream_queue_depth") <= 2, what="the waiting work dropped")
    runner.release.set()
    assert running.stop() == 0


def test_a_failed_output_of_a_partition_that_moved_away_is_not_dead_lettered_here():
    """A failed output whose report comes after its partition went to another worker is that
    worker's to answer: no dead letter here for a record this worker no longer owns."""
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)

    def fail(topic: str, value: bytes | None) -> BaseException | None:
        return MessageSizeTooLargeError("too large for the topic") if topic == OUT else None

    consumer, producer = FakeConsumer(partitions=2), FakeProducer(hold=True, fail=fail)
    consumer.append(0, doc("moved", "Peter ."))
    running = Running(Worker(CFG, tagger, consumer, producer))
    wait_for(lambda: producer.pending() == 1, what="the output sent (held)")
    consumer.rebalance(revoke=[0], assign=[1])  # partition 0 goes to another worker
    wait_for(lambda: consumer.assignment() == {(IN, 1)}, what="partition 0 to go")
    producer.hold = False
    producer.release()  # the report of the output comes now: refused, too large
    time.sleep(0.2)
    assert running.stop() == 0
    assert producer.delivered(DLQ) == [], "dead letter sent for a partition owned by another worker"


def test_a_refused_dead_letter_of_a_partition_that_moved_away_is_not_sent_again_here():
    """Likewise a dead letter refused as too large after its partition was revoked (and not
    given back) is not sent again, cut short, by a worker that no longer owns the record."""
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    consumer = FakeConsumer(partitions=2)
    producer = FakeProducer(hold=True, max_request_size=2_000_000, topic_limits={DLQ: 50_000})
    consumer.append(0, b"\xff" + b"y" * 200_000)  # invalid UTF-8: a dead letter of ~200 kB
    cfg = replace(CFG, max_doc_bytes=1_500_000)
    running = Running(Worker(cfg, tagger, consumer, producer))
    wait_for(lambda: producer.pending() == 1, what="the dead letter sent (held)")
    consumer.rebalance(revoke=[0], assign=[1])
    wait_for(lambda: consumer.assignment() == {(IN, 1)}, what="partition 0 to go")
    producer.hold = False
    producer.release()  # refused by the topic: too large
    time.sleep(0.2)
    assert running.stop() == 0
    assert [s.topic for s in producer.sent] == [DLQ], "dead letter re-sent for a revoked partition"


class SlowRunner:
    """Runs each call in this process after `delay_s` (a slow model); `fast()` drops the delay."""

    def __init__(self, tagger, delay_s: float) -> None:
        self.tagger, self.delay_s, self.calls = tagger, delay_s, 0

    def __call__(self, batches, rows):
        self.calls += 1
        time.sleep(self.delay_s)
        return self.tagger.local(batches, rows)

    def fast(self) -> None:
        self.delay_s = 0.0


def test_backpressure_bounds_the_documents_held_when_every_document_is_long():
    """Under a stream of documents of more than one piece, the long-document lane counts against
    backpressure: the worker holds a bounded number of unanswered documents instead of draining
    its partitions into the lane while the model gets one half-empty micro-batch per pass."""
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    runner = SlowRunner(tagger, delay_s=0.02)
    tagger.use_runner(runner)
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    text = " ".join(["Peter went to Paris ."] * 6)  # 6 windows of 5 tokens: two pieces of <= 24
    n = 300
    for i in range(n):
        consumer.append(0, doc(f"d{i}", text))
    cfg = replace(CFG, queue_docs=4, max_batch_docs=2, max_batch_tokens=48)
    worker = Worker(cfg, tagger, consumer, producer)
    running = Running(worker)
    # Bound: the queue, one poll read ahead (4 x max_batch_docs), two micro-batches in the model.
    bound = cfg.queue_docs + 4 * cfg.max_batch_docs + 2 * cfg.max_batch_docs
    held = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        held = max(held, worker.delivery.in_flight())
        time.sleep(0.01)
    runner.fast()
    try:
        assert held <= bound, f"{held} documents consumed and not answered (bound {bound})"
    finally:
        assert running.stop() == 0


class BrokenBackend:
    """A runner (say ONNX Runtime) whose session is gone: every call raises the backend's own
    error, as onnxruntime does after a CUDA fault."""

    def __call__(self, batches, rows):
        raise RuntimeError("onnxruntime: CUDA failure 700: an illegal memory access")


def test_a_runner_that_fails_on_every_pass_does_not_dead_letter_the_whole_stream():
    """A runner whose backend is broken (every pass raises its own error, not `RunnerDied`) is
    caught by the probe after the first lone failure: the worker stops (exit 1) instead of
    dead-lettering and committing every document."""
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    tagger.use_runner(BrokenBackend())
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    for i in range(10):
        consumer.append(0, doc(f"d{i}", "Peter went to Paris ."))
    running = Running(Worker(CFG, tagger, consumer, producer, restart_model=lambda: None))
    running.thread.join(3)
    code = running.stop()
    assert len(producer.delivered(DLQ)) < 10, "every document dead-lettered and committed"
    assert code == 1


SENTENCE = "Peter went to Paris and the Peter went to Paris and the Peter ."  # 14 tokens


BACKLOG_CASES = {
    # --max-batch-docs 1; the long document: 168 tokens, pieces of <= 128 (of 256 a batch).
    "max-batch-docs-1": (dict(max_batch_docs=1), " ".join([SENTENCE] * 12), "Paris ."),
    # test_worker's long-document limits (48 tokens a batch, windows of up to 32); the long
    # document: a window of 30 tokens (over half a batch: it cannot share one) and one of 9;
    # short documents of 20 tokens.
    "window-over-half-a-batch": (
        dict(max_batch_tokens=48, max_pass_tokens=48, max_chunk_tokens=32),
        " ".join(["Paris"] * 29) + " . Peter went to Paris and the Peter went .",
        " ".join(["Peter"] * 19) + " .",
    ),
}


@pytest.mark.parametrize("case", list(BACKLOG_CASES))
def test_a_long_document_ahead_of_a_backlog_is_tagged_while_the_backlog_flows(case):
    """End to end: a long document consumed ahead of a backlog is tagged while the backlog flows
    (among the first 100 outputs), so its partition's commits do not stall behind it."""
    overrides, long_text, short_text = BACKLOG_CASES[case]
    cfg = replace(CFG, **overrides)
    tagger = make_tagger("rigged", max_chunk_tokens=cfg.max_chunk_tokens,
                         max_pass_tokens=cfg.max_pass_tokens)  # fmt: skip
    tagger.use_runner(SlowRunner(tagger, delay_s=0.004))
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    for i in range(5):
        consumer.append(0, doc(f"a{i}", short_text))
    consumer.append(0, doc("long", long_text))
    n = 300
    for i in range(n):
        consumer.append(0, doc(f"s{i}", short_text))
    running = Running(Worker(cfg, tagger, consumer, producer))
    try:
        wait_for(lambda: len(producer.delivered(OUT)) >= 100, what="100 outputs")
        ids = output_ids(producer)
        committed = consumer.committed_offset(0)
        assert "long" in ids, f"{len(ids)} outputs, not the long document's; committed: {committed}"
    finally:
        wait_for(lambda: len(producer.delivered(OUT)) == n + 6, timeout=30, what="all outputs")
        assert running.stop() == 0


class ErrorThenOomRunner:
    """A model process that answers an error for a pass holding "and" (say, an allocation that
    failed in the network) and, after that failure alone, is killed by the kernel a moment later
    (the memory it grabbed): its next pass is lost (`ModelProcessError`, a `RunnerDied`). A
    restart brings a healthy process."""

    def __init__(self, tagger) -> None:
        self.tagger = tagger
        self.and_id = tagger.vocabs.words.stoi["and"]
        self.dying = False
        self.restarts = 0

    def __call__(self, batches, rows):
        if self.dying:
            raise ModelProcessError("the model process stopped (exit code -9)")
        if any((b.words == self.and_id).any() for b in batches):
            if sum(rows) == 1:
                self.dying = True
            raise RuntimeError("the model process failed on a pass: RuntimeError: out of memory")
        return self.tagger.local(batches, rows)

    def restart(self) -> None:
        self.dying = False
        self.restarts += 1


def test_a_model_process_that_dies_during_the_probe_is_restarted_not_declared_broken():
    """A model process that dies while it runs the probe after a document failed alone is
    restarted, as any death is; the document, which failed alone, is dead-lettered and the stream
    goes on (no crash loop on one record)."""
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    runner = ErrorThenOomRunner(tagger)
    tagger.use_runner(runner)
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    consumer.append(0, doc("d0", "Peter went to Paris ."))
    consumer.append(0, doc("bad", "Peter and Paris ."))
    consumer.append(0, doc("d2", "Peter went to Paris ."))
    worker = Worker(CFG, tagger, consumer, producer, restart_model=runner.restart)
    running = Running(worker)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and running.thread.is_alive():
        if output_ids(producer) == {"d0", "d2"} and committed_all(consumer):
            break
        time.sleep(0.01)
    fatal = worker.fatal
    code = running.stop()
    assert fatal is None, f"stopped on: {fatal}"
    assert code == 0
    assert runner.restarts == 1
    assert output_ids(producer) == {"d0", "d2"}
    assert len(producer.delivered(DLQ)) == 1
    assert consumer.committed_offset(0) == 3


@pytest.fixture
def hanging_process(rigged_file, monkeypatch) -> Iterator[ModelProcess]:
    """A model process whose child stops answering on the word "and", found hung after 1 s."""
    monkeypatch.setenv(HANG_WORD_ENV, "and")
    proc = ModelProcess(rigged_file, "fp32", threads=1, pass_timeout_s=1.0)
    yield proc
    proc.close()


def test_a_document_that_hangs_the_model_process_is_dead_lettered_and_the_rest_go_on(
    hanging_process,
):
    worker, producer, _ = run_with_a_marked_document(hanging_process, 8, marked=3)
    (dead,) = producer.delivered(DLQ)
    assert dead.header("ner_stream.reason") == b"model_crash"
    assert dead.header("ner_stream.source.offset") == b"3"
    assert b"did not answer a pass in 1 s" in dead.header("ner_stream.detail")
    value = worker.metrics.registry.get_sample_value
    assert value("ner_stream_model_restarts_total") == 2  # with the batch, then alone


def test_documents_beyond_the_token_budget_wait_as_records_and_are_tokenized_when_room_comes():
    """A burst of large documents (legal records up to --max-doc-bytes) must not be tokenized
    all at once: a tokenized document holds far more memory than its record. While the model is
    busy, the worker tokenizes only what --queue-tokens lets into the work queue, and every
    document is still tagged once the model frees up."""
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    runner = HeldRunner(tagger)
    tagger.use_runner(runner)
    tokenized: list[str] = []
    prepare = tagger.prepare

    def counting_prepare(text: str):
        tokenized.append(text)
        return prepare(text)

    tagger.prepare = counting_prepare  # type: ignore[method-assign]
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    text = " ".join(["Peter went to Paris ."] * 40)  # 200 tokens: a long document here
    n = 60
    for i in range(n):
        consumer.append(0, doc(f"d{i}", text))
    cfg = replace(CFG, queue_docs=64, queue_tokens=1000, max_batch_docs=8, max_batch_tokens=256)
    worker = Worker(cfg, tagger, consumer, producer)
    running = Running(worker)
    try:
        wait_for(lambda: runner.rows, what="a pass in the model")
        time.sleep(0.5)  # the consumer thread keeps polling meanwhile
        # The tagging side holds at most two long documents (its lane); the work queue 1000
        # tokens, plus the one document that crossed the budget.
        assert len(tokenized) <= 2 + 1000 // 200 + 1, f"{len(tokenized)} of {n} tokenized"
        assert worker.work.tokens <= 1000 + 200
        assert worker.backpressure.paused
    finally:
        runner.release.set()
    wait_for(lambda: len(output_ids(producer)) == n, timeout=30, what="every document tagged")
    assert running.stop() == 0
    assert len(tokenized) == n  # each once
    assert worker.work.tokens == 0


def test_a_document_finished_after_the_shutdown_deadline_is_not_sent_and_not_an_error(caplog):
    """Shutdown waits --shutdown-timeout-s for the tagging thread; a long document still in the
    model then is left to the partition's next owner (its offset is not committed), and when it
    finishes later nothing is sent on the closed producer, nor logged as an error."""
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    runner = HeldRunner(tagger)
    tagger.use_runner(runner)
    consumer, producer = FakeConsumer(partitions=1), FakeProducer()
    consumer.append(0, doc("late", "Peter went to Paris ."))
    worker = Worker(replace(CFG, shutdown_timeout_s=0.3), tagger, consumer, producer)
    running = Running(worker)
    wait_for(lambda: runner.rows, what="the document in the model")
    with caplog.at_level(logging.ERROR):
        assert running.stop() == 0
        runner.release.set()  # the model answers after the worker has stopped
        time.sleep(0.5)
    assert producer.sent == []
    assert consumer.committed_offset(0) in (None, 0)
    assert worker.fatal is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
