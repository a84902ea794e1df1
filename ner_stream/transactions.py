"""Exactly-once delivery: outputs, dead letters and input offsets committed in Kafka transactions.

A transaction holds the outputs and dead letters of a run of micro-batches and the input offsets
they complete (`send_offsets_to_transaction`), and is committed on the commit interval, on a
revoke and at shutdown. A `read_committed` reader of the output and dead-letter topics then sees
each input answered exactly once: a crash before the commit leaves the transaction to be aborted
(by the broker, or by the worker's next start under the same transactional id), and its inputs
are read again from the committed offsets.

Two rules make it hold:

- *Offsets cover exactly what was sent.* Documents finish out of order, but a transaction may
  commit only a contiguous prefix of each partition's offsets. So records are sent in offset order
  per partition: a finished document waits (`ready`) until every consumed record before it is
  sent (offsets never consumed, such as transaction markers, are not waited for). Every record
  sent is then inside the committed prefix, and none outside it.
- *One thread owns the transaction.* Either thread may finish a document (`_emit` only queues it);
  the consumer thread (or the rebalance listener, while that thread waits in `poll`) sends,
  commits and aborts, with the consumer's group metadata.

On any produce or commit error the transaction is aborted and every partition is rewound to its
last committed offset: the work in progress is dropped (`restart` gives the worker's partitions
new `Partition` objects, so that no late output of it is sent) and read again. A record the broker
refused for itself is remembered, so that when it comes again its output becomes a dead letter
(or its dead letter a smaller one) instead of failing the transaction again. An abort that fails
(a producer fenced by another with the same transactional id, say) stops the worker, and so does
an abort for a missing permission (an ACL), which the next try would only meet again.

Fencing a zombie: a worker expelled from the group (paused past the session timeout) still holds
an open transaction. Its offsets go with its group metadata (generation and member id), which the
group coordinator checks (KIP-447, brokers >= 2.5): the old generation is refused
(`CommitFailedError`), the worker aborts, and nothing it sent becomes visible.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from kafka.errors import (
    InvalidProducerEpochError,
    ProducerFencedError,
    TransactionalIdAuthorizationFailedError,
)

from ner_stream.config import WorkerConfig
from ner_stream.delivery import (
    TIGHT_DEAD_LETTER_BYTES,
    Ack,
    Consumed,
    Delivery,
    Job,
    Letter,
    Partition,
    ProducerLike,
    TopicPartition,
)
from ner_stream.kafka_io import (
    InputConsumer,
    SizeLimits,
    is_record_error,
    is_refusal,
    is_size_error,
    offset_request,
)
from ner_stream.messages import OutRecord, Rejection, Source
from ner_stream.metrics import Metrics

log = logging.getLogger(__name__)


class TransactionalProducer(ProducerLike, Protocol):
    """The transactional calls of kafka-python's KafkaProducer (its `init_transactions` is made
    at start, by `kafka_io.make_producer`)."""

    def begin_transaction(self) -> None: ...
    def send_offsets_to_transaction(self, offsets: dict, group_metadata: Any) -> None: ...
    def commit_transaction(self) -> None: ...
    def abort_transaction(self) -> None: ...


@dataclass(frozen=True)
class Outgoing:
    """A finished record waiting for its turn: the output or dead letter of input `src`."""

    topic: str
    out: OutRecord
    record: Consumed
    src: Source
    job: Job | None = None
    letter: Letter | None = None

    @property
    def tp(self) -> TopicPartition:
        return (self.src.topic, self.src.partition)


# Another producer took this worker's transactional id: that worker is alive, this one must stop.
_FENCED = (ProducerFencedError, InvalidProducerEpochError, TransactionalIdAuthorizationFailedError)


class MembershipLost(Exception):
    """The consumer is not (or no longer) a member of its group: no offsets may be committed."""


class _Aborted(Exception):
    """The transaction was aborted while sending: stop sending this round."""


class TransactionalDelivery(Delivery):
    """`Delivery` with exactly-once semantics (see the module docstring).

    `restart(tps)` is called after an abort with the partitions rewound: the worker then drops
    their work in progress (new `Partition` objects). Times come from `clock` (seconds).
    """

    def __init__(
        self,
        cfg: WorkerConfig,
        producer: TransactionalProducer,
        consumer: InputConsumer,
        metrics: Metrics,
        limits: SizeLimits,
        owner: Callable[[TopicPartition], Partition | None],
        restart: Callable[[list[TopicPartition]], None],
        clock: Callable[[], float] = time.monotonic,
        new_producer: Callable[[], TransactionalProducer] | None = None,
    ) -> None:
        super().__init__(cfg, producer, consumer, metrics, limits, owner, clock)
        self.producer: TransactionalProducer = producer
        self.restart = restart
        self.new_producer = new_producer
        self.finished: queue.SimpleQueue[Outgoing] = queue.SimpleQueue()
        self.ready: dict[TopicPartition, dict[int, Outgoing]] = {}
        self.open_since: float | None = None  # the clock when the open transaction began
        # An abort failed: the producer can neither commit nor abort any more (the worker stops).
        self.broken = False
        self.deadline: float | None = None  # the shutdown's deadline (clock seconds), once set
        self.in_transaction: list[Outgoing] = []
        # Input records whose output or dead letter the broker refused for itself: why, and the
        # dead letter refused (None: the output was).
        self.refused: dict[tuple[TopicPartition, int], tuple[BaseException, Letter | None]] = {}
        # Records that failed with a refusal in a transaction with others: kafka-python fails
        # every batch not yet sent with the error of the one the broker refused, so only a
        # record refused alone (`alone`, see `_send_alone`, or the only one of its
        # transaction) is known to be at fault.
        self.suspects: set[tuple[TopicPartition, int]] = set()
        self.alone: tuple[TopicPartition, int] | None = None
        self.aborts = 0

    # ------------------------------------------------------------- either thread

    def _emit(
        self,
        topic: str,
        out: OutRecord,
        record: Consumed,
        src: Source,
        job: Job | None = None,
        letter: Letter | None = None,
    ) -> None:
        """Queue a finished record for the consumer thread, which sends it in its turn."""
        self.finished.put(Outgoing(topic, out, record, src, job, letter))

    # ------------------------------------------------------------- consumer thread only

    def apply_acks(self) -> None:
        """Abort if a record of the open transaction failed; then send, in offset order, every
        finished record whose predecessors are all sent."""
        if self.broken:
            return
        try:
            self._check_failures()
            while self._take_finished():
                self._send_ready()
        except _Aborted:
            pass

    def _take_finished(self) -> bool:
        """Move the queued finished records of owned partitions to `ready`; True if any."""
        moved = False
        while True:
            try:
                item = self.finished.get_nowait()
            except queue.Empty:
                return moved
            if self.owner(item.tp) is not item.record.partition:
                continue  # revoked, or dropped by an abort: read again from the committed offset
            self.ready.setdefault(item.tp, {})[item.src.offset] = item
            moved = True

    def _send_ready(self) -> None:
        for tp, waiting in self.ready.items():
            while waiting:
                # The next record consumed, not `position`: offsets that are never consumed
                # (transaction markers, records compacted away) lie between them.
                offset = self.tracker.next_pending(tp)
                item = waiting.pop(offset, None) if offset is not None else None
                if item is None:
                    break
                if self._send_one(item):
                    self.tracker.ack(tp, offset)

    def _send_one(self, item: Outgoing) -> bool:
        """Send `item` in the open transaction (begun if none is); True when sent. False when it
        was replaced by a dead letter (queued: it is sent in a later round) or stopped the
        worker; raises `_Aborted` when the transaction had to be aborted."""
        key = (item.tp, item.src.offset)
        refusal = self.refused.pop(key, None)
        if refusal is not None and (refusal[1] is not None or item.job is not None):
            self._replace(item, *refusal)
            return False
        if key in self.suspects:
            return self._send_alone(item)
        try:
            if self.open_since is None:
                self.producer.begin_transaction()
                self.open_since = self.clock()
            future = self._send(item.topic, item.out)
        except Exception as e:
            if is_record_error(e):  # refused by the client itself: the transaction is intact
                self._replace(item, e, item.letter)
                return False
            self._abort(e)
            raise _Aborted from e
        self.in_transaction.append(item)
        self._on_delivery(future, item.src.topic, item.src.partition, item.src.offset,
                          item.record, item.job, item.letter)  # fmt: skip
        return True

    def _send_alone(self, item: Outgoing) -> bool:
        """Send a suspect (see `suspects`) in a transaction of its own: what precedes it is
        committed first, and it is flushed at once, so that a refusal now is its own. Raises
        `_Aborted` when either transaction is aborted."""
        key = (item.tp, item.src.offset)
        aborts = self.aborts
        if self.open_since is not None:
            self.commit()
            if self.aborts != aborts or self.broken:
                raise _Aborted
        self.suspects.discard(key)
        self.alone = key
        try:
            sent = self._send_one(item)
            if sent:
                self.producer.flush(timeout=self.cfg.transaction_timeout_ms / 2000)
            self._check_failures()  # a refusal now is conclusive: remembered in `refused`
        except _Aborted:
            raise
        except Exception as e:
            self._abort(e)
            raise _Aborted from e
        finally:
            self.alone = None
        return sent

    def _replace(self, item: Outgoing, error: BaseException, refused: Letter | None) -> None:
        """What goes in place of a record whose output (`refused` None) or dead letter
        (`refused`) was refused for itself: its document's dead letter, or a dead letter cut to
        `TIGHT_DEAD_LETTER_BYTES`; a dead letter refused at that size stops the worker."""
        if refused is None and item.job is not None:
            self._output_failed(item.job, error)
            return
        letter = refused or item.letter
        if letter is not None and is_size_error(error) and letter.limit > TIGHT_DEAD_LETTER_BYTES:
            log.warning("dead letter for %s/%d too large for its topic; sending %d bytes",
                        *item.tp, TIGHT_DEAD_LETTER_BYTES)  # fmt: skip
            # The record as consumed now: the refused letter's belongs to a dropped assignment.
            self.dead_letter(letter.rejection, item.record, limit=TIGHT_DEAD_LETTER_BYTES)
            return
        self._dead_letter_failed(item.src, error)

    def _check_failures(self) -> None:
        """Abort, and raise `_Aborted`, when a delivery report says a record failed."""
        failed = self._failures()
        if failed:
            first = failed[0]
            self._abort(first.error or RuntimeError(f"send for {first.tp}/{first.offset} failed"))
            raise _Aborted

    def _failures(self) -> list[Ack]:
        """The failed delivery reports that came; a record refused for itself is remembered in
        `refused`, to be replaced when it is read again."""
        failed: list[Ack] = []
        while True:
            try:
                ack = self.acks.get_nowait()
            except queue.Empty:
                return failed
            if ack.ok:
                continue
            failed.append(ack)
            if not is_record_error(ack.error):
                continue
            key = (ack.tp, ack.offset)
            only = [(i.tp, i.src.offset) for i in self.in_transaction[:2]] == [key]
            if key == self.alone or only:
                self.refused[key] = (ack.error or RuntimeError("refused"), ack.letter)
            else:
                self.suspects.add(key)

    def commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit the open transaction with the offsets of everything it sent (all partitions:
        `only` does not apply to a transaction); any error aborts it (see `_abort`)."""
        self.last_commit = self.clock()
        if self.open_since is None or self.broken:
            return
        t0 = time.perf_counter()
        wait = self.cfg.transaction_timeout_ms / 2000
        if self.deadline is not None:  # shutting down: within --shutdown-timeout-s
            wait = min(wait, max(0.1, self.deadline - self.clock()))
        try:
            self.producer.flush(timeout=wait)
            self._check_failures()
            offsets = self.tracker.committable()
            if offsets:
                membership = self.consumer.group_metadata()
                if membership.generation_id < 0 or not membership.member_id:
                    # The broker checks only a known generation: offsets sent without one would
                    # be accepted, from a worker whose partitions may be another's by now.
                    raise MembershipLost("this worker is not a member of its group now")
                self.producer.send_offsets_to_transaction(offset_request(offsets), membership)
            self.producer.commit_transaction()
        except _Aborted:
            return
        except Exception as e:
            self._abort(e)
            return
        self.tracker.mark_committed(offsets)
        self._ended("committed")
        self.metrics.commits.labels("ok").inc()
        self.metrics.stage["commit"].observe(time.perf_counter() - t0)
        now_ms = time.time() * 1000
        for item in self.in_transaction:
            self.metrics.outcome["ok" if item.job is not None else "dead_letter"].inc()
            if item.letter is not None:
                self.metrics.dead_letters.labels(str(item.letter.rejection.reason)).inc()
            ts = item.record.timestamp_ms
            if item.job is not None and ts and ts > 0:
                self.metrics.end_to_end.observe(max(0.0, (now_ms - ts) / 1000))
        self.in_transaction.clear()
        log.debug("transaction committed with offsets %s", offsets)

    def _abort(self, error: BaseException) -> None:
        """Abort the open transaction and rewind every partition to its last committed offset;
        when the abort itself fails, `fatal` stops the worker."""
        if self.broken:  # the worker is stopping; its restart aborts what is left open
            return
        log.warning("transaction aborted (%s: %s); reading again from the committed offsets",
                    type(error).__name__, error)  # fmt: skip
        self.metrics.commits.labels("failed").inc()
        self.aborts += 1
        failed = self._failures()
        refused = is_record_error(error) or any(is_record_error(a.error) for a in failed)
        if self.open_since is not None:
            try:
                self.producer.abort_transaction()
            except Exception as e:
                if not self._renew_producer(e):
                    return
            else:
                if refused and self.new_producer is not None and not self._renew_producer(error):
                    return
            self._ended("aborted")
        self.in_transaction.clear()
        tps = self.tracker.partitions()
        for tp in tps:
            committed = self.tracker.committed(tp)
            if committed is not None:
                self.consumer.rewind(tp, committed)
            self.tracker.revoke(tp)
        self.ready.clear()
        self.restart(tps)
        self._take_finished()  # of the dropped work: discarded
        # A missing ACL is not granted by waiting: reading again would abort again, for ever.
        # Stop (exit code 1) with nothing of this transaction visible. The refusal may be the
        # error that made the abort, or one of the delivery reports it drained.
        refusal = next((e for e in (error, *(a.error for a in failed)) if is_refusal(e)), None)
        if refusal is not None and self.fatal is None:
            self.fatal = refusal

    def _renew_producer(self, error: BaseException) -> bool:
        """Replace the producer by a new one under the same transactional id, whose start aborts
        whatever the old one left open; False (and `fatal`) when there is no way to.

        Needed after a refused record: kafka-python (3.0) then fails every send of the next
        transaction with OutOfOrderSequenceNumberError, and that transaction cannot be aborted.
        Not done when another producer took the transactional id (fenced): that worker is alive
        and this one must stop.
        """
        if self.new_producer is None or isinstance(error, _FENCED):
            log.error("the transaction cannot be aborted (%s: %s); stopping",
                      type(error).__name__, error)  # fmt: skip
            self.fatal, self.broken = error, True
            return False
        log.warning("starting a new transactional producer after %s", type(error).__name__)
        try:
            self.producer.close(timeout=1)
        except Exception as e:  # the new producer's start fences it anyway
            log.debug("closing the old producer failed: %s", e)
        try:
            self.producer = self.new_producer()
        except Exception as e:
            log.error("a new transactional producer could not start (%s: %s); stopping",
                      type(e).__name__, e)  # fmt: skip
            self.fatal, self.broken = e, True
            return False
        self.acks = queue.SimpleQueue()  # reports of the old producer's sends mean nothing now
        return True

    def _ended(self, result: str) -> None:
        if self.open_since is not None:
            self.metrics.transaction_seconds.observe(max(0.0, self.clock() - self.open_since))
        self.metrics.transaction[result].inc()
        self.open_since = None

    def on_revoked(self, tps: list[TopicPartition]) -> None:
        """Partitions revoked: commit the transaction (what is sent for every partition), then
        rewind each revoked partition to its first record not sent and forget it."""
        self.apply_acks()
        self.commit()
        for tp in tps:
            self.revoke(tp)

    def on_lost(self, tps: list[TopicPartition]) -> None:
        """Partitions lost with the group membership: the open transaction is aborted (its
        offsets would be refused, see the module docstring) and the partitions forgotten."""
        if self.open_since is not None:
            self._abort(MembershipLost("this worker is no longer a member of its group"))
        for tp in tps:
            self.revoke(tp)

    def count_dead_letter(self, rejection: Rejection) -> None:
        """Dead letters are counted when their transaction commits (`commit`): an aborted one
        builds them again."""

    def held(self) -> int:
        """Finished records waiting for an earlier one of their partition, or for their turn."""
        return sum(len(waiting) for waiting in self.ready.values()) + self.finished.qsize()

    def revoke(self, tp: TopicPartition) -> None:
        """Forget a revoked partition (see `Delivery.revoke`) and its records waiting to be
        sent."""
        super().revoke(tp)
        self.ready.pop(tp, None)

    def finish(self, deadline: float) -> int:
        """At shutdown, once nothing more is finished: send what is ready, commit; returns the
        records left out of the commit, which the partitions' next owner reads again."""
        self.deadline = deadline
        self.apply_acks()
        self.commit()
        left = self.tracker.in_flight()
        if left:
            log.warning("%d documents not committed; they will be reprocessed", left)
        return left
