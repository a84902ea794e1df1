"""Delivery: outputs and dead letters to the producer, acknowledgements to offsets, offsets to
commits. At least once: an input offset is committed only once its output or dead letter is
acknowledged, and so is every offset before it (`offsets.OffsetTracker`).

Records are sent from either of the worker's threads; the producer's delivery reports arrive on
its I/O thread and only queue an `Ack`. The consumer thread applies them (`Delivery.apply_acks`)
and commits, so only that thread touches the offset tracker and the consumer; the rebalance
listener too, which kafka-python 3 runs on its own I/O thread while the consumer thread waits in
`poll`. The worker calls `tick` after each poll, `on_assigned` / `on_revoked` from the
listener, and `finish` / `close` at shutdown: when and what is committed is decided here.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ner_stream.config import WorkerConfig
from ner_stream.kafka_io import InputConsumer, SizeLimits, is_record_error, is_size_error
from ner_stream.messages import (
    Document,
    Entity,
    OutRecord,
    Rejection,
    RejectReason,
    Source,
    dead_letter,
    encode_output,
    processing_error,
)
from ner_stream.metrics import Metrics
from ner_stream.offsets import OffsetTracker

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]

# A dead letter the broker refused as too large (a topic limit the worker could not read at start)
# is sent once more, cut to this size; refused again, the worker stops.
TIGHT_DEAD_LETTER_BYTES = 8_192


class ProducerLike(Protocol):
    """The part of kafka-python's KafkaProducer the worker uses."""

    def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None): ...
    def flush(self, timeout: float | None = None) -> None: ...
    def close(self, timeout: float | None = None) -> None: ...


@dataclass(eq=False)
class Partition:
    """One owned input partition, for one assignment: `active` turns false when it is revoked."""

    tp: TopicPartition
    active: bool = True


@dataclass(frozen=True)
class Consumed:
    """What a dead letter or an output needs of the input record it answers."""

    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    partition: Partition


@dataclass(eq=False)
class Job:
    """One document on its way through the tagging stage.

    `prepared` is the tagger's `PreparedDoc`; `entities` holds the entities of each of its windows
    as they come; `pieces_left` counts the pieces (see `ner_stream.scheduler`) still in the model,
    -1 once the document is dead-lettered.
    """

    doc: Document
    prepared: Any
    record: Consumed
    queued_at: float = 0.0
    tokens: int = 0  # of the prepared document, for the work queue's budget
    entities: list[list[Entity]] = field(default_factory=list)
    pieces_left: int = 0

    @property
    def live(self) -> bool:
        """The one rule for work in progress: it goes on while its partition is owned and it has
        not been dead-lettered."""
        return self.record.partition.active and self.pieces_left >= 0


@dataclass(frozen=True)
class Letter:
    """A dead letter on its way: what is needed to send it again, smaller, if it is refused."""

    rejection: Rejection
    record: Consumed
    limit: int  # the size it was built to


@dataclass(frozen=True)
class Ack:
    """A delivery report from the producer's I/O thread."""

    tp: TopicPartition
    offset: int
    ok: bool
    part: Partition  # the assignment the record was consumed under
    timestamp_ms: int
    error: BaseException | None = None
    job: Job | None = None  # an output (None: a dead letter); a failed one is dead-lettered
    letter: Letter | None = None  # a dead letter; a refused one is sent again, bounded harder


class Delivery:
    """Sends outputs and dead letters, applies their acknowledgements, commits.

    `owner(tp)` is the partition object of the current assignment of `tp` (None when not owned).
    A failure about the broker rather than one record sets `fatal`; the worker then stops without
    committing past the record.
    """

    def __init__(
        self,
        cfg: WorkerConfig,
        producer: ProducerLike,
        consumer: InputConsumer,
        metrics: Metrics,
        limits: SizeLimits,
        owner: Callable[[TopicPartition], Partition | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.producer = producer
        self.consumer = consumer
        self.metrics = metrics
        self.limits = limits
        self.owner = owner
        self.clock = clock
        self.tracker = OffsetTracker()
        self.acks: queue.SimpleQueue[Ack] = queue.SimpleQueue()
        self.fatal: BaseException | None = None
        self.last_commit = clock()
        self.closed = False  # the producer is closed: nothing more is sent

    # ------------------------------------------------------------- sending (either thread)

    def output(self, job: Job, name: str, version: str) -> None:
        """Send a tagged document's output, or its dead letter when the output cannot be one (it
        cannot be encoded, is larger than the output topic takes, or the producer refuses it);
        errors about the broker raise."""
        t0 = time.perf_counter()
        entities = [e for window in job.entities for e in window]
        for e in entities:
            self.metrics.entities.labels(e.type).inc()
        src = job.doc.source
        try:
            value = encode_output(job.doc, entities, name, version)
        except (ValueError, TypeError, RecursionError) as e:
            self.dead_letter(processing_error(src, e), job.record)
            return
        record = OutRecord(value, job.record.key, job.record.headers)
        size, limit = record.size, self.limits.output
        if size > limit:
            detail = f"output is {size} bytes, limit {limit}"
            self.dead_letter(Rejection(RejectReason.OUTPUT_TOO_LARGE, detail, src), job.record)
            return
        self._emit(self.cfg.output_topic, record, job.record, src, job=job)
        self.metrics.stage["produce"].observe(time.perf_counter() - t0)

    def dead_letter(self, rejection: Rejection, record: Consumed, limit: int | None = None) -> None:
        """Send the dead letter of a record (bounded to the topic's size limit, see
        `messages.dead_letter`); a dead letter that cannot be sent sets `fatal`.

        `limit` is None for a record's first dead letter (counted, logged, sized to the topic); a
        smaller size sends a refused one again, uncounted.
        """
        src = rejection.source
        if limit is None:
            self.count_dead_letter(rejection)
            log.warning(
                "dead letter %s/%d/%d: %s (%s)",
                src.topic, src.partition, src.offset, rejection.reason, rejection.detail[:200],
            )  # fmt: skip
            limit = self.limits.dead_letter
        letter = Letter(rejection, record, limit)
        try:
            value = dead_letter(rejection, record.value, record.key, record.headers, limit)
        except Exception as e:
            self._dead_letter_failed(src, e)
            return
        self._emit(self.cfg.dlq_topic, value, record, src, letter=letter)

    def count_dead_letter(self, rejection: Rejection) -> None:
        """Count a record's dead letter (once per record, not per attempt)."""
        self.metrics.dead_letters.labels(str(rejection.reason)).inc()

    def held(self) -> int:
        """Finished records kept in memory until their turn to be sent (none at least once:
        each is sent as it finishes)."""
        return 0

    def _dead_letter_failed(self, src: Source, error: BaseException) -> None:
        # Not delivered, so never committed: a restart reprocesses the record.
        log.error("dead letter for %s/%d/%d failed: %s", src.topic, src.partition, src.offset,
                  error)  # fmt: skip
        self.fatal = error

    def _emit(
        self,
        topic: str,
        out: OutRecord,
        record: Consumed,
        src: Source,
        job: Job | None = None,
        letter: Letter | None = None,
    ) -> None:
        """Send the output (`job`) or dead letter (`letter`) of the input record at `src`.

        At least once, it goes to the producer now, from the calling thread; its delivery report
        comes back as an `Ack`. An output the producer refuses for itself is dead-lettered;
        other errors about the broker raise (output) or set `fatal` (dead letter).
        """
        if self.closed:
            # Shutdown gave up waiting for the tagging thread (a long document): the record is
            # not committed, so the partition's next owner reads it again.
            log.debug("not sent after shutdown: %s/%d/%d", src.topic, src.partition, src.offset)
            return
        try:
            future = self._send(topic, out)
        except Exception as e:
            if job is None:
                self._dead_letter_failed(src, e)
                return
            if not is_record_error(e):
                raise
            self._output_failed(job, e)
            return
        self._on_delivery(future, src.topic, src.partition, src.offset, record, job, letter)

    def _send(self, topic: str, record: OutRecord) -> Any:
        """Hand a record to the producer; returns its future (raises what `send` raises)."""
        return self.producer.send(topic, value=record.value, key=record.key, headers=record.headers)

    def _on_delivery(
        self,
        future: Any,
        topic: str,
        partition: int,
        offset: int,
        record: Consumed,
        job: Job | None = None,
        letter: Letter | None = None,
    ) -> None:
        put, tp, part, ts = self.acks.put, (topic, partition), record.partition, record.timestamp_ms
        future.add_callback(lambda _md: put(Ack(tp, offset, True, part, ts, job=job)))
        future.add_errback(lambda e: put(Ack(tp, offset, False, part, ts, e, job, letter)))

    def _output_failed(self, job: Job, error: BaseException | None) -> None:
        """An output refused for itself (size, encoding): the document is dead-lettered instead,
        so that its offset can still advance."""
        log.error("output for %s failed: %r", job.doc.id, error)
        if is_size_error(error):
            detail = f"{type(error).__name__}: {error}"
            rejection = Rejection(RejectReason.OUTPUT_TOO_LARGE, detail, job.doc.source)
        else:
            rejection = processing_error(job.doc.source, error or RuntimeError("send failed"))
        self.dead_letter(rejection, job.record)

    # ------------------------------------------------------------- consumer thread only

    def track(self, tp: TopicPartition, offset: int) -> None:
        """A record consumed: its offset is in flight until acknowledged."""
        self.tracker.track(tp, offset)

    def apply_acks(self) -> None:
        """Apply the delivery reports that have come: offsets done, or records sent again."""
        now_ms = time.time() * 1000
        while True:
            try:
                ack = self.acks.get_nowait()
            except queue.Empty:
                return
            owner = self.owner(ack.tp)
            if owner is not ack.part and (owner is not None or not ack.ok):
                # Sent under an assignment that has ended. Owned again now (the flush on revoke
                # timed out), the record is read again and its offset may not even be tracked
                # again yet: the report must not reach the new offset tracker. Owned by another
                # worker, a failed record is that worker's to answer: no dead letter or retry
                # here. (A success still counts while the revoke commits what was delivered.)
                log.debug("ignoring a late delivery report for %s/%d", ack.tp, ack.offset)
                continue
            self._apply(ack, now_ms)

    def _apply(self, ack: Ack, now_ms: float) -> None:
        output = ack.job is not None
        if ack.ok:
            self.tracker.ack(ack.tp, ack.offset)
            self.metrics.outcome["ok" if output else "dead_letter"].inc()
            if output and ack.timestamp_ms and ack.timestamp_ms > 0:
                self.metrics.end_to_end.observe(max(0.0, (now_ms - ack.timestamp_ms) / 1000))
        elif not is_record_error(ack.error):
            # The broker or the cluster, not this record: stop without committing past it, so
            # that a restart reprocesses it.
            what = "output" if output else "dead letter"
            error = ack.error or RuntimeError(f"{what} send failed")
            self._stop_on(error, "%s for %s/%d/%d failed: %r", what, *ack.tp, ack.offset, error)
        elif ack.job is not None:
            self._output_failed(ack.job, ack.error)
        elif (
            ack.letter is not None
            and is_size_error(ack.error)
            and ack.letter.limit > TIGHT_DEAD_LETTER_BYTES
        ):
            letter = ack.letter
            log.warning("dead letter for %s/%d too large for its topic; sending %d bytes",
                        *ack.tp, TIGHT_DEAD_LETTER_BYTES)  # fmt: skip
            self.dead_letter(letter.rejection, letter.record, limit=TIGHT_DEAD_LETTER_BYTES)
        else:
            error = ack.error or RuntimeError("dead-letter send failed")
            self._stop_on(error, "dead letter for %s/%d/%d failed: %r", *ack.tp, ack.offset, error)

    def _stop_on(self, error: BaseException, message: str, *args: Any) -> None:
        """Make `error` fatal unless an earlier one is. Only the first is logged as an error: the
        records in flight behind it (thousands at load) mostly fail the same way."""
        if self.fatal is None:
            log.error(message, *args)
            self.fatal = error
        else:
            log.debug(message, *args)

    def in_flight(self) -> int:
        """Records consumed and not yet acknowledged (output or dead letter)."""
        return self.tracker.in_flight()

    def tick(self, now: float) -> None:
        """The consumer thread's turn, after each poll: apply the acknowledgements that came, and
        commit when the commit interval has passed since the last commit (`now` in seconds)."""
        self.apply_acks()
        if (now - self.last_commit) * 1000 >= self.cfg.commit_interval_ms:
            self.commit()

    def on_assigned(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions assigned: each starts afresh at the first record consumed."""
        for tp in tps:
            self.tracker.revoke(tp)

    def on_revoked(self, tps: list[TopicPartition]) -> None:
        """Partitions revoked: what was sent for them is worth committing, so wait (bounded) for
        its acknowledgements, commit them, then rewind each partition to its first record without
        an acknowledged output and forget it (see `revoke`)."""
        try:
            self.producer.flush(timeout=min(10.0, self.cfg.shutdown_timeout_s))
        except Exception as e:
            log.warning("flush on revoke failed: %s", e)
        self.apply_acks()
        self.commit(only=tps)
        for tp in tps:
            self.revoke(tp)

    def on_lost(self, tps: list[TopicPartition]) -> None:
        """Partitions lost with the group membership: as a revoke (a commit the broker refuses
        is counted and logged; the next owner repeats that work)."""
        self.on_revoked(tps)

    def finish(self, deadline: float) -> int:
        """At shutdown, once nothing more is sent: wait for the acknowledgements until `deadline`
        (the clock's seconds), commit them; returns the records left unacknowledged, which the
        partitions' next owner reads again."""
        try:
            self.producer.flush(timeout=max(0.1, deadline - self.clock()))
        except Exception as e:
            log.warning("flush on shutdown failed: %s", e)
        self.apply_acks()
        self.commit()
        left = self.tracker.in_flight()
        if left:
            log.warning("%d documents not acknowledged in time; they will be reprocessed", left)
        return left

    def close(self, deadline: float) -> None:
        """Close the producer, waiting at most until `deadline` for what it still holds; what
        the tagging thread finishes afterwards is not sent (`_emit`)."""
        self.closed = True
        try:
            self.producer.close(timeout=max(0.1, deadline - self.clock()))
        except Exception as e:
            log.warning("closing the producer failed: %s", e)

    def commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit the acknowledged prefix of each partition (of `only`, when given); a failed
        commit is counted and retried at the next one."""
        offsets = self.tracker.committable()
        if only is not None:
            wanted = set(only)
            offsets = {tp: o for tp, o in offsets.items() if tp in wanted}
        self.last_commit = self.clock()
        if not offsets:
            return
        t0 = time.perf_counter()
        try:
            self.consumer.commit(offsets)
        except Exception as e:  # a rebalance in progress: the next commit retries
            self.metrics.commits.labels("failed").inc()
            log.warning("commit failed (will retry): %s", e)
            return
        self.tracker.mark_committed(offsets)
        self.metrics.commits.labels("ok").inc()
        self.metrics.stage["commit"].observe(time.perf_counter() - t0)
        log.debug("committed %s", offsets)

    def revoke(self, tp: TopicPartition) -> None:
        """Forget a revoked partition, after seeking it back to its first record without an
        acknowledged output, so that the work dropped with it is read again."""
        position = self.tracker.position(tp)
        if position is not None:
            self.consumer.rewind(tp, position)
        self.tracker.revoke(tp)
