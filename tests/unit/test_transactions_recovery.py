"""Exactly-once where the input or the broker is unusual: offsets never read (transaction
markers), records the broker refuses, a slow record holding others back, counters across aborts,
shutdown after a failed abort (see `test_transactions.py` for the `Setup` driver)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest

from ner_stream.config import WorkerConfig
from ner_stream.worker import Worker
from tests.fakes import FakeConsumer, FakeTransactionalProducer, make_tagger, wait_for
from tests.unit.test_transactions import CFG, DLQ, IN, OUT, Setup

# ------------------------------------------------------------------ offsets that are never read


def test_offsets_taken_by_transaction_markers_do_not_stall_a_partition():
    """An input topic written by a transactional producer (another exactly-once worker, Kafka
    Streams, Flink...) has a commit marker after each transaction: offsets that a read_committed
    consumer never receives. The record after a marker must still be sent and committed."""
    s = Setup()
    first = s.consume(0, 0)
    after_marker = s.consume(0, 2)  # offset 1: the commit marker of the upstream transaction
    s.finish(first)
    s.finish(after_marker)
    s.tick(0.5)
    s.tick(1.0)
    assert s.visible_ids() == ["0-0", "0-2"]
    assert s.committed(0) == 3
    assert not any(s.delivery.ready.values()), "a finished record is waiting forever"


def test_the_worker_answers_every_record_of_a_transactionally_written_input():
    consumer = FakeConsumer(IN, 1)
    producer = FakeTransactionalProducer(consumer)
    cfg = replace(CFG, commit_interval_ms=20, max_batch_docs=8, max_batch_tokens=256,
                  max_pass_tokens=256, max_chunk_tokens=32, max_wait_ms=5,
                  shutdown_timeout_s=5.0)  # fmt: skip
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=256)
    ids = []
    for t in range(5):  # five upstream transactions of four records, each with its marker
        for i in range(4):
            ids.append(f"t{t}-{i}")
            consumer.append(0, json.dumps({"id": ids[-1], "text": "Peter went ."}).encode())
        consumer.append_marker(0)
    worker = Worker(cfg, tagger, consumer, producer)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: consumer.committed_offset(0) == 24, timeout=10,
                 what="every record committed")  # fmt: skip
    finally:
        stop.set()
        thread.join(10)
    assert sorted(json.loads(x.value)["id"] for x in producer.visible(OUT)) == sorted(ids)


# ------------------------------------------------------------------ records the broker refuses


def _big(job, value_bytes: int = 0):
    job.doc = replace(job.doc, id="x" * 500)  # its output is over the output topic's 400 bytes
    if value_bytes:
        job.record = replace(job.record, value=b"v" * value_bytes)
    return job


def test_an_output_and_then_its_dead_letter_refused_ends_in_a_smaller_dead_letter():
    """Topic limits unknown at start (no DescribeConfigs permission, or lowered since): the
    output is refused, then its dead letter (which carries the 20 kB input) too. At least once,
    the dead letter is then sent cut to 8 kB; exactly once must not abort the same record over
    and over, forever, without answering it or stopping."""
    s = Setup(topic_limits={OUT: 400, DLQ: 9_000})
    now = 0.0
    for _attempt in range(4):  # each attempt: read again from the committed offset, tag, send
        s.finish(_big(s.consume(0, 0), value_bytes=20_000))
        for _ in range(4):
            now += 0.6
            s.tick(now)
        if s.committed(0) == 1 or s.delivery.fatal is not None:
            break
    assert s.delivery.fatal is None
    letters = s.producer.visible(DLQ)
    assert len(letters) == 1 and letters[0].size <= 9_000
    assert s.committed(0) == 1
    assert s.producer.transactions.count("aborted") <= 2


def test_records_aborted_with_a_refused_one_are_not_dead_lettered():
    """kafka-python fails every send of the transaction that had not left yet with the error of
    the record the broker refused (KIP-654; seen on a real broker: the small records batched
    behind a too-large one fail with MessageSizeTooLargeError). Those records are innocent: when
    read again they must get their outputs, and only the large one a dead letter."""
    s = Setup(topic_limits={OUT: 400}, hold=True)
    jobs = [s.consume(0, o) for o in range(4)]
    _big(jobs[1])
    for job in jobs:
        s.finish(job)
    s.tick(0.1)  # all four sent, none delivered yet
    s.producer.hold = False
    s.producer.release()  # offset 1 refused; 2 and 3, not sent yet, fail with its error
    s.tick(1.0)
    assert s.producer.transactions == ["aborted"]
    # Read again from offset 0 after each abort: the suspects go alone, one is refused again.
    s.replay(0, 4, lambda job: _big(job) if job.doc.source.offset == 1 else job)
    assert s.committed(0) == 4
    assert s.visible_ids() == ["0-0", "0-2", "0-3"]
    letters = s.producer.visible(DLQ)
    assert [x.header("ner_stream.source.offset") for x in letters] == [b"1"]


# ------------------------------------------------------------------ at least once unchanged


def test_at_least_once_accepts_a_commit_interval_of_a_minute_or_more():
    """--transaction-timeout-ms means nothing at least once; a commit interval that was valid
    before exactly-once existed must still be."""
    cfg = WorkerConfig(commit_interval_ms=120_000)
    assert not cfg.exactly_once
    # Exactly once, a transaction must outlive a commit interval.
    eos = {"processing_guarantee": "exactly-once", "instance_id": "w0"}
    with pytest.raises(ValueError, match="--transaction-timeout-ms must exceed"):
        WorkerConfig(commit_interval_ms=120_000, **eos)
    WorkerConfig(commit_interval_ms=120_000, transaction_timeout_ms=180_000, **eos)


# ------------------------------------------------------------------ memory


class SlowRunner:
    def __init__(self, tagger, delay_s: float) -> None:
        self.tagger, self.delay_s = tagger, delay_s

    def __call__(self, batches, rows):
        time.sleep(self.delay_s)
        return self.tagger.local(batches, rows)


def test_records_waiting_behind_a_slow_first_record_are_bounded_by_backpressure():
    """Exactly once, a record finished before an earlier one of its partition waits in memory
    (`ready`, with its output and its tagged document). Backpressure must bound how many: a
    long document at the head of a partition must not let the worker read and hold the rest of
    the partition while it is tagged (at least once, those outputs are sent and let go)."""
    cfg = replace(CFG, queue_docs=4, max_batch_docs=2, max_batch_tokens=64, max_pass_tokens=64,
                  max_chunk_tokens=32, max_wait_ms=5, commit_interval_ms=20,
                  shutdown_timeout_s=5.0)  # fmt: skip
    tagger = make_tagger("rigged", max_chunk_tokens=32, max_pass_tokens=64)
    tagger.use_runner(SlowRunner(tagger, delay_s=0.002))
    consumer = FakeConsumer(IN, 1)
    producer = FakeTransactionalProducer(consumer)
    long_text = " ".join(["Peter went to Paris ."] * 300)  # 1500 tokens: many pieces
    consumer.append(0, json.dumps({"id": "long", "text": long_text}).encode())
    n = 600
    for i in range(n):
        consumer.append(0, json.dumps({"id": f"s{i}", "text": "Paris ."}).encode())
    worker = Worker(cfg, tagger, consumer, producer)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    bound = cfg.queue_docs + 4 * cfg.max_batch_docs + 2 * cfg.max_batch_docs  # as at least once
    held = 0
    try:
        deadline = time.monotonic() + 30
        while consumer.committed_offset(0) != n + 1 and time.monotonic() < deadline:
            held = max(held, sum(len(w) for w in worker.delivery.ready.values()))
            time.sleep(0.005)
    finally:
        stop.set()
        thread.join(10)
    assert consumer.committed_offset(0) == n + 1
    assert held <= bound, f"{held} finished records held in memory (bound {bound})"


# ------------------------------------------------------------------ metrics


def test_the_dead_letter_counter_counts_dead_letters_not_attempts():
    """An aborted transaction reads its records again: the dead letter of a record is built once
    per attempt, but only one reaches the topic. `ner_stream_dead_letters_total` (the
    NerStreamDeadLetterRateHigh alert divides it by the documents committed) must count the one."""
    s = Setup()
    s.reject(s.consume(0, 0))
    s.tick(0.5)
    s.producer.fail_commits = 1
    s.tick(1.0)  # aborted
    s.reject(s.consume(0, 0))  # read again
    s.tick(1.5)
    s.tick(2.5)
    assert len(s.producer.visible(DLQ)) == 1
    counted = s.metrics.dead_letters.labels("invalid_json")._value.get()
    assert counted == 1, f"{counted} dead letters counted, 1 in the topic"


# ------------------------------------------------------------------ shutdown


def test_shutdown_after_a_failed_abort_stays_within_the_shutdown_deadline():
    """Once an abort failed (fatal: the producer is fenced or in a state it cannot abort from),
    the way out must not block past --shutdown-timeout-s: `finish` and the revoke that closing
    the consumer runs each flushed for transaction_timeout_ms / 2 (30 s) on the real broker."""
    s = Setup()
    s.finish(s.consume(0, 0))
    s.tick(0.5)
    s.producer.fence()
    s.tick(1.0)  # the abort fails: fatal
    assert s.delivery.fatal is not None
    waits: list[float | None] = []
    flush = s.producer.flush

    def recording_flush(timeout=None):
        waits.append(timeout)
        return flush(timeout)

    s.producer.flush = recording_flush
    s.clock.now = 2.0
    s.delivery.finish(deadline=5.0)  # 3 s left
    s.delivery.on_revoked([(IN, 0), (IN, 1)])  # the consumer's close revokes its partitions
    assert None not in waits and sum(waits) <= 3.0, f"flushes of {waits} s"
