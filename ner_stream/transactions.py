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
  sent. Every record sent is then inside the committed prefix, and none outside it.
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
from ner_stream.messages import OutRecord, Source
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
    ) -> None:
        super().__init__(cfg, producer, consumer, metrics, limits, owner, clock)
        self.producer: TransactionalProducer = producer
        self.restart = restart
        self.finished: queue.SimpleQueue[Outgoing] = queue.SimpleQueue()
        self.ready: dict[TopicPartition, dict[int, Outgoing]] = {}
        self.open_since: float | None = None  # the clock when the open transaction began
        self.in_transaction: list[Outgoing] = []
        # Input records whose output or dead letter the broker refused for itself, and why.
        self.refused: dict[tuple[TopicPartition, int], BaseException] = {}

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
                position = self.tracker.position(tp)
                item = waiting.pop(position, None) if position is not None else None
                if item is None:
                    break
                if self._send_one(item):
                    self.tracker.ack(tp, position)

    def _send_one(self, item: Outgoing) -> bool:
        """Send `item` in the open transaction (begun if none is); True when sent. False when it
        was replaced by a dead letter (queued: it is sent in a later round) or stopped the
        worker; raises `_Aborted` when the transaction had to be aborted."""
        refusal = self.refused.pop((item.tp, item.src.offset), None)
        if refusal is not None:
            self._replace(item, refusal)
            return False
        try:
            if self.open_since is None:
                self.producer.begin_transaction()
                self.open_since = self.clock()
            future = self._send(item.topic, item.out)
        except Exception as e:
            if is_record_error(e):  # refused by the client itself: the transaction is intact
                self._replace(item, e)
                return False
            self._abort(e)
            raise _Aborted from e
        self.in_transaction.append(item)
        self._on_delivery(future, item.src.topic, item.src.partition, item.src.offset,
                          item.record, item.job, item.letter)  # fmt: skip
        return True

    def _replace(self, item: Outgoing, error: BaseException) -> None:
        """What goes in place of a record refused for itself: its document's dead letter, or a
        dead letter cut to `TIGHT_DEAD_LETTER_BYTES`; a dead letter refused at that size stops
        the worker."""
        if item.job is not None:
            self._output_failed(item.job, error)
            return
        letter = item.letter
        if letter is not None and is_size_error(error) and letter.limit > TIGHT_DEAD_LETTER_BYTES:
            log.warning("dead letter for %s/%d too large for its topic; sending %d bytes",
                        *item.tp, TIGHT_DEAD_LETTER_BYTES)  # fmt: skip
            self.dead_letter(letter.rejection, letter.record, limit=TIGHT_DEAD_LETTER_BYTES)
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
            if is_record_error(ack.error):
                self.refused[(ack.tp, ack.offset)] = ack.error or RuntimeError("refused")

    def commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit the open transaction with the offsets of everything it sent (all partitions:
        `only` does not apply to a transaction); any error aborts it (see `_abort`)."""
        self.last_commit = self.clock()
        if self.open_since is None:
            return
        t0 = time.perf_counter()
        try:
            self.producer.flush(timeout=self.cfg.transaction_timeout_ms / 2000)
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
            ts = item.record.timestamp_ms
            if item.job is not None and ts and ts > 0:
                self.metrics.end_to_end.observe(max(0.0, (now_ms - ts) / 1000))
        self.in_transaction.clear()
        log.debug("transaction committed with offsets %s", offsets)

    def _abort(self, error: BaseException) -> None:
        """Abort the open transaction and rewind every partition to its last committed offset;
        when the abort itself fails, `fatal` stops the worker."""
        log.warning("transaction aborted (%s: %s); reading again from the committed offsets",
                    type(error).__name__, error)  # fmt: skip
        self.metrics.commits.labels("failed").inc()
        failed = self._failures()
        if self.open_since is not None:
            try:
                self.producer.abort_transaction()
            except Exception as e:
                log.error("aborting the transaction failed (%s: %s); stopping",
                          type(e).__name__, e)  # fmt: skip
                self.fatal = e
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

    def revoke(self, tp: TopicPartition) -> None:
        """Forget a revoked partition (see `Delivery.revoke`) and its records waiting to be
        sent."""
        super().revoke(tp)
        self.ready.pop(tp, None)

    def finish(self, deadline: float) -> int:
        """At shutdown, once nothing more is finished: send what is ready, commit; returns the
        records left out of the commit, which the partitions' next owner reads again."""
        self.apply_acks()
        self.commit()
        left = self.tracker.in_flight()
        if left:
            log.warning("%d documents not committed; they will be reprocessed", left)
        return left
