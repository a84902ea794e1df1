"""The Kafka loop: consume -> decode -> tokenize -> batch -> tag -> produce -> commit.

Two threads share the work:

- the consumer thread (the caller of `Worker.run`) owns the KafkaConsumer: it polls, decodes and
  tokenizes each record, hands documents to the tagging stage through a bounded queue, sends dead
  letters, applies acknowledgements to the offset tracker and commits. When the queue is full it
  pauses its partitions and keeps polling, so the group never expels it (backpressure);
- the tagging thread forms micro-batches, runs the model and sends the outputs. With a model
  process (`ner_stream.model_process`, the default on the CPU) the forward pass runs there: the
  thread submits a batch, keeps at most one more queued behind it, and decodes spans and
  produces the outputs of each batch while the model runs the next.

When the model process dies (killed for memory, a native crash), the tagging thread starts a
fresh one and runs the documents of the passes it lost one at a time; a document that kills the
model again on its own goes to the dead-letter topic (`model_crash`) and the stream goes on. Deaths
more frequent than `RestartWindow` allows, or a model process that cannot start again, stop the
worker (exit code 1) without committing the documents it had.

The producer's acknowledgements arrive on its I/O thread and are handed back to the consumer
thread through a queue: only that thread touches the offset tracker, so commits never pass a
record whose output (or dead letter) is not acknowledged.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTP

from ner_stream.batching import BatchLimits, MicroBatcher
from ner_stream.config import WorkerConfig
from ner_stream.kafka_io import SizeLimits, is_record_error, is_size_error
from ner_stream.messages import (
    Document,
    Entity,
    OutRecord,
    Rejection,
    RejectReason,
    Source,
    carried_headers,
    dead_letter,
    decode,
    encode_output,
    processing_error,
)
from ner_stream.metrics import Health, Metrics
from ner_stream.model_process import ModelProcessError, RestartWindow
from ner_stream.offsets import OffsetTracker
from ner_stream.tagger import BatchStats, PendingTags, PreparedDoc, Tagger

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


class ConsumerLike(Protocol):
    """The part of kafka-python's KafkaConsumer the worker uses (an in-memory one in tests)."""

    def subscribe(self, topics: list[str], listener: Any = None) -> None: ...
    def topics(self) -> set[str]: ...
    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict: ...
    def pause(self, *partitions: Any) -> None: ...
    def resume(self, *partitions: Any) -> None: ...
    def assignment(self) -> set: ...
    def commit(self, offsets: dict | None = None) -> None: ...
    def close(self, autocommit: bool = True) -> None: ...


class ProducerLike(Protocol):
    """The part of kafka-python's KafkaProducer the worker uses."""

    def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None): ...
    def flush(self, timeout: float | None = None) -> None: ...
    def close(self, timeout: float | None = None) -> None: ...


@dataclass(eq=False)
class Partition:
    """One owned input partition. `active` turns false on revoke; late work for it is skipped."""

    tp: TopicPartition
    active: bool = True


@dataclass(eq=False)
class Job:
    """One document on its way through the tagging stage."""

    doc: Document
    prepared: PreparedDoc
    value: bytes | None  # the original record value, for a dead letter
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    partition: Partition
    queued_at: float = 0.0
    entities: list[list[Entity]] = field(default_factory=list)  # per chunk, filled when tagged
    pieces_left: int = 0


@dataclass(eq=False)
class Piece:
    """A run of one job's chunks, small enough to share a forward pass with other documents."""

    job: Job
    chunks: list[int]
    tokens: int


@dataclass(frozen=True)
class Letter:
    """A dead letter on its way: what is needed to send it again, smaller, if it is refused."""

    rejection: Rejection
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int
    part: Partition | None
    limit: int  # the size it was built to


@dataclass(frozen=True)
class Ack:
    """A delivery report from the producer's I/O thread."""

    tp: TopicPartition
    offset: int
    ok: bool
    output: bool  # an output record (False: a dead letter)
    timestamp_ms: int
    error: BaseException | None = None
    job: Job | None = None  # for an output that failed: sent on as a dead letter
    part: Partition | None = None  # the assignment the record was consumed under
    letter: Letter | None = None  # for a dead letter that failed: sent again, bounded harder


_STOP = object()
MODEL_POLL_S = 0.002  # how often the tagging thread looks for a finished forward pass
# A dead letter the broker refused as too large (a topic limit the worker could not read at
# start) is sent once more, cut to this size; refused again, the worker stops.
TIGHT_DEAD_LETTER_BYTES = 8_192
# Tagged alone after a document killed the model alone: a model that dies on this too dies on
# anything, and the document is not to blame.
PROBE_TEXT = "probe"


class Worker(ConsumerRebalanceListener):
    """Runs the flow until `stop` is set; see the module docstring.

    It is its own rebalance listener: kafka-python's `subscribe` accepts only instances of
    `ConsumerRebalanceListener` (a TypeError otherwise).

    `restart_model` starts a fresh model process in place of one that died (raising
    `ModelProcessError` if it cannot); without it a dead model process stops the worker.
    `restarts` decides how often that may happen (default: `RestartWindow()`).
    """

    def __init__(
        self,
        cfg: WorkerConfig,
        tagger: Tagger,
        consumer: ConsumerLike,
        producer: ProducerLike,
        metrics: Metrics | None = None,
        health: Health | None = None,
        clock: Callable[[], float] = time.monotonic,
        limits: SizeLimits | None = None,
        restart_model: Callable[[], None] | None = None,
        restarts: RestartWindow | None = None,
    ) -> None:
        self.cfg = cfg
        self.limits = limits or SizeLimits.of_producer(cfg)
        self.tagger = tagger
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        self.clock = clock
        self.tracker = OffsetTracker()
        self.partitions: dict[TopicPartition, Partition] = {}
        self.work: queue.Queue = queue.Queue(maxsize=cfg.queue_docs)
        self.overflow: deque[Job] = deque()  # consumed but the queue was full, in order
        self.acks: queue.SimpleQueue[Ack] = queue.SimpleQueue()
        self.paused = False
        self.fatal: BaseException | None = None
        self._last_commit = clock()
        self._consumer_thread: threading.Thread | None = None
        self._last_lag = 0.0
        self._tagging = threading.Thread(target=self._tagging_loop, name="tagging", daemon=True)
        # Submitted to the model, oldest first; only the tagging thread touches it.
        self._in_model: deque[tuple[list[Piece], PendingTags]] = deque()
        # Answered (or lost with a dead model), taken off `_in_model`, not yet finished: kept
        # here rather than in a local list so that a model death can account for them.
        self._done: deque[tuple[list[Piece], PendingTags]] = deque()
        self._restart_model = restart_model
        self._restarts = restarts or RestartWindow()
        self._probe_doc: PreparedDoc | None = None
        self.health.model_loaded = True
        self.metrics.model.info(
            {
                "name": tagger.name,
                "version": tagger.version,
                "architecture": tagger.info.config.arch,
                "device": str(tagger.device),
                "precision": tagger.precision.precision,
            }
        )

    # ---------------------------------------------------------------- consumer thread

    def run(self, stop: threading.Event) -> int:
        """Consume until `stop` is set or a fatal error; returns the process exit code."""
        self._consumer_thread = threading.current_thread()
        self.consumer.subscribe([self.cfg.input_topic], listener=self)
        # Fetch metadata before the first poll: a join that races the topic's metadata can leave
        # kafka-python's group leader without partitions.
        self.consumer.topics()
        self._tagging.start()
        try:
            while not stop.is_set() and self.fatal is None and self._tagging.is_alive():
                self._step()
        finally:
            code = self._shutdown()
        return code

    def _step(self) -> None:
        self._apply_acks()
        self._drain_overflow()
        self._backpressure()
        batches = self.consumer.poll(timeout_ms=100, max_records=self.cfg.max_batch_docs * 4)
        for records in batches.values():
            for record in records:
                self._consume(record)
        self._apply_acks()
        now = self.clock()
        if (now - self._last_commit) * 1000 >= self.cfg.commit_interval_ms:
            self._commit()
        if now - self._last_lag >= 5.0:
            self._update_lag()
            self._last_lag = now
        self.metrics.queue_depth.set(self.work.qsize() + len(self.overflow))
        self.metrics.in_flight.set(self.tracker.in_flight())
        self.health.progressed()

    def _consume(self, record: Any) -> None:
        tp = (record.topic, record.partition)
        part = self.partitions.get(tp)
        if part is None or not part.active:
            # A record fetched before a revoke: its new owner will read it again.
            return
        self.tracker.track(tp, record.offset)
        source = Source(record.topic, record.partition, record.offset)
        # Null header values become empty ones here, once, for the output and the dead letter.
        headers = carried_headers(list(record.headers or []))
        t0 = time.perf_counter()
        decoded = decode(record.value, record.key, source, self.cfg.max_doc_bytes)
        self.metrics.stage["decode"].observe(time.perf_counter() - t0)
        if isinstance(decoded, Rejection):
            self._dead_letter(decoded, record.value, record.key, headers, record.timestamp, part)
            return
        t1 = time.perf_counter()
        try:
            prepared = self.tagger.prepare(decoded.text)
        except Exception as e:  # one bad document must not stop the stream
            log.exception("tokenizing %s failed", decoded.id)
            self._dead_letter(processing_error(source, e), record.value, record.key, headers,
                              record.timestamp, part)  # fmt: skip
            return
        self.metrics.stage["tokenize"].observe(time.perf_counter() - t1)
        job = Job(decoded, prepared, record.value, record.key, headers, record.timestamp, part,
                  queued_at=self.clock())  # fmt: skip
        if self.overflow or not self._offer(job):
            self.overflow.append(job)

    def _offer(self, job: Job) -> bool:
        try:
            self.work.put_nowait(job)
            return True
        except queue.Full:
            return False

    def _drain_overflow(self) -> None:
        while self.overflow and self._offer(self.overflow[0]):
            self.overflow.popleft()

    def _backpressure(self) -> None:
        """Pause every owned partition while work is waiting for room; resume when drained."""
        assigned = list(self.consumer.assignment())
        if self.overflow and not self.paused:
            self.consumer.pause(*assigned)
            self.paused = True
            log.debug("backpressure: paused %d partitions", len(assigned))
        elif self.paused and not self.overflow and self.work.qsize() <= self.cfg.queue_docs // 2:
            self.consumer.resume(*assigned)
            self.paused = False
            log.debug("backpressure: resumed %d partitions", len(assigned))
        self.metrics.paused.set(len(assigned) if self.paused else 0)

    def _dead_letter(
        self,
        rejection: Rejection,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        timestamp_ms: int,
        part: Partition | None = None,
        limit: int | None = None,
    ) -> None:
        """Send the dead letter of a record (bounded to the topic's size limit, see
        `messages.dead_letter`); a dead letter that cannot be sent stops the worker.

        `limit` is None for a record's first dead letter (counted, logged, sized to the topic);
        a smaller size sends a refused one again, uncounted.
        """
        src = rejection.source
        tp = (src.topic, src.partition)
        if limit is None:
            self.metrics.dead_letters.labels(str(rejection.reason)).inc()
            log.warning(
                "dead letter %s/%d/%d: %s (%s)",
                src.topic, src.partition, src.offset, rejection.reason, rejection.detail[:200],
            )  # fmt: skip
            limit = self.limits.dead_letter
        letter = Letter(rejection, value, key, headers, timestamp_ms, part, limit)
        try:
            record = dead_letter(rejection, value, key, headers, limit)
            future = self._send(self.cfg.dlq_topic, record)
        except Exception as e:
            # Not acknowledged, so never committed: a restart reprocesses the record.
            log.error("dead letter for %s/%d/%d failed: %s", *tp, src.offset, e)
            self.fatal = e
            return
        self._on_delivery(future, tp, src.offset, timestamp_ms, output=False, job=None, part=part,
                          letter=letter)  # fmt: skip

    def _send(self, topic: str, record: OutRecord) -> Any:
        """Hand a record to the producer; returns its future (raises what `send` raises)."""
        return self.producer.send(topic, value=record.value, key=record.key, headers=record.headers)

    def _on_delivery(
        self,
        future: Any,
        tp: TopicPartition,
        offset: int,
        ts: int,
        output: bool,
        job: Job | None,
        part: Partition | None = None,
        letter: Letter | None = None,
    ) -> None:
        put = self.acks.put
        future.add_callback(lambda _md: put(Ack(tp, offset, True, output, ts, part=part)))
        future.add_errback(lambda e: put(Ack(tp, offset, False, output, ts, e, job, part, letter)))

    def _apply_acks(self) -> None:
        now_ms = time.time() * 1000
        while True:
            try:
                ack = self.acks.get_nowait()
            except queue.Empty:
                return
            owner = self.partitions.get(ack.tp)
            if ack.part is not None and owner is not None and owner is not ack.part:
                # Sent under an earlier assignment of a partition owned again now (the flush on
                # revoke timed out): the record is read again, and its offset may not even be
                # tracked again yet, so the report must not reach the new offset tracker.
                log.debug("ignoring a late delivery report for %s/%d", ack.tp, ack.offset)
                continue
            if ack.ok:
                self.tracker.ack(ack.tp, ack.offset)
                self.metrics.outcome["ok" if ack.output else "dead_letter"].inc()
                if ack.output and ack.timestamp_ms and ack.timestamp_ms > 0:
                    self.metrics.end_to_end.observe(max(0.0, (now_ms - ack.timestamp_ms) / 1000))
            elif not is_record_error(ack.error):
                # The broker or the cluster, not this record: stop without committing past it,
                # so that a restart reprocesses it.
                what = "output" if ack.output else "dead letter"
                log.error("%s for %s/%d/%d failed: %r", what, *ack.tp, ack.offset, ack.error)
                self.fatal = ack.error or RuntimeError(f"{what} send failed")
            elif ack.output and ack.job is not None:
                self._output_failed(ack.job, ack.error)
            elif (
                ack.letter is not None
                and is_size_error(ack.error)
                and ack.letter.limit > TIGHT_DEAD_LETTER_BYTES
            ):
                letter = ack.letter
                log.warning("dead letter for %s/%d too large for its topic; sending %d bytes",
                            *ack.tp, TIGHT_DEAD_LETTER_BYTES)  # fmt: skip
                self._dead_letter(letter.rejection, letter.value, letter.key, letter.headers,
                                  letter.timestamp_ms, letter.part,
                                  limit=TIGHT_DEAD_LETTER_BYTES)  # fmt: skip
            else:
                log.error("dead letter for %s/%d/%d failed: %r", *ack.tp, ack.offset, ack.error)
                self.fatal = ack.error or RuntimeError("dead-letter send failed")

    def _output_failed(self, job: Job, error: BaseException | None) -> None:
        """An output refused for itself (size, encoding): the document is dead-lettered instead,
        so that its offset can still advance."""
        log.error("output for %s failed: %r", job.doc.id, error)
        if is_size_error(error):
            rejection = Rejection(RejectReason.OUTPUT_TOO_LARGE, f"{type(error).__name__}: "
                                  f"{error}", job.doc.source)  # fmt: skip
        else:
            rejection = processing_error(job.doc.source, error or RuntimeError("send failed"))
        self._dead_letter(rejection, job.value, job.key, job.headers, job.timestamp_ms,
                          job.partition)  # fmt: skip

    def _commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        offsets = self.tracker.committable()
        if only is not None:
            wanted = set(only)
            offsets = {tp: o for tp, o in offsets.items() if tp in wanted}
        self._last_commit = self.clock()
        if not offsets:
            return
        t0 = time.perf_counter()
        request = {KafkaTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        try:
            if self._on_client_thread() and hasattr(self.consumer, "commit_async"):
                # kafka-python 3 runs the rebalance listener on the consumer's own I/O thread,
                # where a blocking commit is refused ("Cannot block on net.run() from the IO
                # thread"): send the commit without waiting; it goes out ahead of the rejoin.
                self.consumer.commit_async(request)
            else:
                self.consumer.commit(request)
        except Exception as e:  # a rebalance in progress: the next commit retries
            self.metrics.commits.labels("failed").inc()
            log.warning("commit failed (will retry): %s", e)
            return
        self.tracker.mark_committed(offsets)
        self.metrics.commits.labels("ok").inc()
        self.metrics.stage["commit"].observe(time.perf_counter() - t0)
        log.debug("committed %s", offsets)

    def _update_lag(self) -> None:
        highwater = getattr(self.consumer, "highwater", None)
        position = getattr(self.consumer, "position", None)
        if highwater is None or position is None:
            return
        for tp in list(self.consumer.assignment()):
            try:
                end, pos = highwater(tp), position(tp, timeout_ms=100)
            except Exception:  # position unknown yet: skip this round
                continue
            if end is not None and pos is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, end - pos))

    # ---------------------------------------------------------------- rebalance listener

    def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        """Stop work for the revoked partitions and commit what is done for them."""
        tps = [(tp.topic, tp.partition) for tp in revoked]
        if not tps:
            return
        self.metrics.rebalances.labels("revoked").inc()
        for tp in tps:
            part = self.partitions.pop(tp, None)
            if part is not None:
                part.active = False
        self.overflow = deque(j for j in self.overflow if j.partition.active)
        # Outputs already sent are worth committing: wait for their acknowledgements.
        try:
            self.producer.flush(timeout=min(10.0, self.cfg.shutdown_timeout_s))
        except Exception as e:
            log.warning("flush on revoke failed: %s", e)
        self._apply_acks()
        self._commit(only=tps)
        for tp in tps:
            self._rewind(tp)
            self.tracker.revoke(tp)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(tp[0], str(tp[1]))
        self.health.assigned = len(self.partitions)
        self.metrics.assigned.set(len(self.partitions))
        log.info("partitions revoked: %s", sorted(tps))

    def _on_client_thread(self) -> bool:
        """True when called on a Kafka client thread rather than the one running `run`."""
        return (
            self._consumer_thread is not None
            and threading.current_thread() is not self._consumer_thread
        )

    def _rewind(self, tp: TopicPartition) -> None:
        """Seek a revoked partition back to its first record without an acknowledged output.

        The work dropped on revoke must be read again. kafka-python 2.x restarts a reassigned
        partition from its committed offset, but 3.x keeps the fetch position of a partition that
        the next assignment gives back to this consumer: without this seek, the documents that
        were queued but not yet produced would be skipped for good.
        """
        position = self.tracker.position(tp)
        seek = getattr(self.consumer, "seek", None)
        if position is None or seek is None:
            return
        try:
            seek(KafkaTP(*tp), position)
        except Exception as e:  # not assigned any more (membership lost): nothing to rewind
            log.debug("no rewind of %s/%d: %s", tp[0], tp[1], e)

    def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        """Start tracking the new partitions from their committed offsets."""
        tps = [(tp.topic, tp.partition) for tp in assigned]
        self.metrics.rebalances.labels("assigned").inc()
        for tp in tps:
            self.partitions[tp] = Partition(tp)
            self.tracker.revoke(tp)  # start afresh at the first record consumed
        if self.paused and tps:
            self.consumer.pause(*assigned)
        self.health.assigned = len(self.partitions)
        self.metrics.assigned.set(len(self.partitions))
        log.info("partitions assigned: %s", sorted(tps))

    # ---------------------------------------------------------------- tagging thread

    def _tagging_loop(self) -> None:
        try:
            self._tag_until_stopped()
        except BaseException as e:  # the consumer thread sees it and shuts down
            log.exception("the tagging stage failed")
            self.fatal = e

    def _tag_until_stopped(self) -> None:
        limits = BatchLimits(
            max_docs=self.cfg.max_batch_docs,
            max_tokens=self.cfg.max_batch_tokens,
            max_wait_s=self.cfg.max_wait_ms / 1000,
        )
        batcher: MicroBatcher[Piece] = MicroBatcher(limits)
        # The pieces of a document too long for one batch wait here and join batches one at a
        # time, so that a huge document shares the model with the documents behind it.
        long_lane: deque[Piece] = deque()
        stopping = False
        while True:
            if stopping:  # nothing more is coming: no reason to keep the model's queue full
                self._drain_model()
            # Passes whose results are in: the model may be free now, and the next batch goes to
            # it before this thread spends its time on their spans and outputs.
            finished = self._take_finished()
            model_free = not self._in_model
            if model_free:
                wait = batcher.time_left(self.clock())
                if long_lane and (wait is None or wait > 0):
                    wait = 0.0
            else:
                wait = MODEL_POLL_S
            if finished:
                wait = 0.0
            item = None
            if not stopping:
                try:
                    item = self.work.get(timeout=0.05 if wait is None else wait)
                except queue.Empty:
                    item = None
            if item is _STOP:
                stopping = True
            elif item is not None:
                pieces = self._pieces(item)
                if len(pieces) > 1:
                    long_lane.extend(pieces)
                else:
                    if not batcher.fits(pieces[0].tokens):
                        self._run_batch(batcher.take())
                    batcher.add(pieces[0], pieces[0].tokens, self.clock())
            now = self.clock()
            idle = item is None
            # While the model is busy a batch keeps growing past its wait limit, up to full:
            # under load the batches grow and the model works on large ones; when it is idle the
            # wait limit alone decides, so light load keeps low latency.
            if (
                batcher.full()
                or (stopping and len(batcher))
                or (model_free and (batcher.due(now) or (long_lane and idle)))
            ):
                pieces = batcher.take()
                if long_lane:
                    pieces.append(long_lane.popleft())
                self._run_batch(pieces)
            self._finish_done()
            if stopping and not len(batcher) and not long_lane:
                self._drain_model()
                return

    def _pieces(self, job: Job) -> list[Piece]:
        """Split a job's chunks into pieces of at most half the token budget each."""
        chunks = job.prepared.chunks
        job.entities = [[] for _ in chunks]
        if not chunks:
            job.pieces_left = 1
            return [Piece(job, [], 0)]
        budget = max(1, self.cfg.max_batch_tokens // 2)
        pieces: list[Piece] = []
        current: list[int] = []
        tokens = 0
        for i, chunk in enumerate(chunks):
            if current and tokens + len(chunk) > budget:
                pieces.append(Piece(job, current, tokens))
                current, tokens = [], 0
            current.append(i)
            tokens += len(chunk)
        pieces.append(Piece(job, current, tokens))
        job.pieces_left = len(pieces)
        return pieces

    def _run_batch(self, pieces: list[Piece]) -> None:
        # A document already dead-lettered (one of its other pieces failed) needs no more passes.
        pieces = [p for p in pieces if p.job.partition.active and p.job.pieces_left > 0]
        if not pieces:
            return
        self.metrics.stage["batch_wait"].observe(
            max(0.0, self.clock() - min(p.job.queued_at for p in pieces))
        )
        items = [(p.job.prepared, c) for p in pieces for c in p.chunks]
        while True:
            try:
                pending = self.tagger.submit(items)
                break
            except ModelProcessError as e:
                # The model died before this pass reached it: recover, then send it to the new
                # one (`_model_died` raises when the model cannot be restarted).
                self._model_died(e, [])
            except Exception:
                self._run_one_by_one(pieces)
                return
        self._in_model.append((pieces, pending))
        # At most one batch waits behind the one the model is running.
        while len(self._in_model) > 2:
            self._finish_done()  # older than any pass still in the model
            self._finish(*self._in_model.popleft())

    def _take_finished(self) -> bool:
        """Move the passes whose results have come to `_done`, oldest first; True if any."""
        moved = False
        while self._in_model:
            pieces, pending = self._in_model[0]
            try:
                if not pending.ready():
                    break
            except ModelProcessError as e:
                self._in_model.popleft()
                self._model_died(e, pieces)
                return True
            self._done.append(self._in_model.popleft())
            moved = True
        return moved

    def _finish_done(self) -> None:
        while self._done:
            self._finish(*self._done.popleft())

    def _drain_model(self) -> None:
        self._finish_done()
        while self._in_model:
            self._finish(*self._in_model.popleft())

    def _finish(self, pieces: list[Piece], pending: PendingTags) -> None:
        """Spans and outputs of a submitted pass (waits for its result)."""
        try:
            per_chunk, stats = pending.result()
        except ModelProcessError as e:
            self._model_died(e, pieces)
            return
        except Exception:
            self._run_one_by_one(pieces)
            return
        self._apply(pieces, per_chunk, stats)

    def _apply(self, pieces: list[Piece], per_chunk: list[list[Entity]], stats: BatchStats) -> None:
        """The entities of a pass (one list per chunk of `pieces`, in order) to their jobs."""
        self.metrics.observe_batch(len(pieces), stats.real_tokens, stats.batches)
        self.metrics.stage["inference"].observe(stats.inference_s)
        self.metrics.stage["spans"].observe(stats.spans_s)
        results = iter(per_chunk)
        for p in pieces:
            for c in p.chunks:
                p.job.entities[c] = next(results)
            self._piece_done(p)

    def _model_died(self, error: ModelProcessError, lost: list[Piece]) -> None:
        """Restart the model process, then run the pieces it took with it one at a time.

        `lost`: pieces of the pass that found the model dead (empty when it was found dead at
        a submit). Every other pass sent to it is settled first: one answered before the death
        is finished as usual, the others are lost too. Raises `ModelProcessError` when the model
        cannot be restarted (see `_restart`): the worker then stops, committing none of them.
        """
        suspects = list(lost)
        others = [*self._done, *self._in_model]
        self._done.clear()
        self._in_model.clear()
        for pieces, pending in others:
            try:
                per_chunk, stats = pending.result()  # no waiting: answered, or lost already
            except Exception:
                suspects.extend(pieces)
            else:
                self._apply(pieces, per_chunk, stats)
        log.error("the model process died with %d documents in flight: %s",
                  len({id(p.job) for p in suspects}), error)  # fmt: skip
        self._restart(error)
        self._run_one_by_one(suspects, after_crash=True)

    def _restart(self, error: ModelProcessError) -> None:
        """Start a fresh model process in place of the dead one.

        Raises `ModelProcessError` (fatal to the worker) when there is no way to restart it, when
        it died more often than `self._restarts` allows, or when the new one cannot start.
        """
        if self._restart_model is None:
            raise error
        window = self._restarts
        if not window.allow(self.clock()):
            raise ModelProcessError(
                f"the model process died more than {window.limit} times in {window.window_s:g} s"
                f" (last: {error}); stopping"
            ) from error
        self.health.model_loaded = False
        try:
            self._restart_model()
        except ModelProcessError as e:
            log.error("the model process could not be started again: %s", e)
            raise
        self.health.model_loaded = True
        self.metrics.model_restarts.inc()
        log.warning("model process restarted (%d of at most %d restarts in %g s)",
                    window.recent(self.clock()), window.limit, window.window_s)  # fmt: skip

    def _run_one_by_one(self, pieces: list[Piece], after_crash: bool = False) -> None:
        """Each piece in a forward pass of its own, after its batch failed or the model died.

        A piece whose lone pass fails is dead-lettered (`processing_error`). When the model dies
        during a lone pass: after a batch failure, the piece and those after it go to
        `_model_died` like any pass lost with the model; after a death (`after_crash`, nothing
        else is in the model then), the piece has killed the model twice, the second time alone,
        and is dead-lettered (`model_crash`) once the model is restarted and survives a probe.
        """
        if after_crash:
            log.warning("running %d documents one at a time after the model process died",
                        len({id(p.job) for p in pieces}))  # fmt: skip
        else:  # called while the batch's exception is handled
            log.exception("a batch of %d documents failed; retrying them one by one", len(pieces))
        for i, p in enumerate(pieces):
            if not p.job.partition.active or p.job.pieces_left <= 0:
                continue  # revoked (its next owner reads it again), or dead-lettered already
            try:
                per_chunk, _ = self.tagger.tag_chunks([(p.job.prepared, c) for c in p.chunks])
            except ModelProcessError as e:
                if not after_crash:
                    self._model_died(e, pieces[i:])
                    return
                self._restart(e)
                self._probe()
                detail = f"it killed the model process twice, alone the second time: {e}"
                self._reject(p, Rejection(RejectReason.MODEL_CRASH, detail, p.job.doc.source))
                continue
            except Exception as e:
                log.exception("document %s failed", p.job.doc.id)
                self._reject(p, processing_error(p.job.doc.source, e))
                continue
            for c, ents in zip(p.chunks, per_chunk, strict=True):
                p.job.entities[c] = ents
            self._piece_done(p)

    def _probe(self) -> None:
        """Run a one-word pass in the restarted model; ModelProcessError if that kills it too.

        After a document killed the model alone: if a tiny pass kills it as well, the model dies
        on any input, and dead-lettering the document (and the next, and the next) would be
        wrong.
        """
        if self._probe_doc is None:
            self._probe_doc = self.tagger.prepare(PROBE_TEXT)
        try:
            self.tagger.tag_chunks([(self._probe_doc, 0)])
        except ModelProcessError as e:
            raise ModelProcessError(
                f"the model process dies on any input (a one-word probe killed it too): {e}"
            ) from e
        except Exception:  # the model answered: it is alive, which is all the probe asks
            log.debug("the probe pass failed", exc_info=True)

    def _reject(self, piece: Piece, rejection: Rejection) -> None:
        """Dead-letter the document of `piece`; none of its pieces produces an output after."""
        job = piece.job
        job.pieces_left = -1
        self._dead_letter(rejection, job.value, job.key, job.headers, job.timestamp_ms,
                          job.partition)  # fmt: skip

    def _piece_done(self, piece: Piece) -> None:
        job = piece.job
        if job.pieces_left <= 0:
            return
        job.pieces_left -= 1
        if job.pieces_left == 0 and job.partition.active:
            self._produce(job)

    def _produce(self, job: Job) -> None:
        """Send a tagged document's output, or its dead letter when the output cannot be one
        (it cannot be encoded, is larger than the output topic takes, or the producer refuses
        it); errors about the broker raise."""
        t0 = time.perf_counter()
        entities = [e for chunk in job.entities for e in chunk]
        for e in entities:
            self.metrics.entities.labels(e.type).inc()
        src = job.doc.source
        try:
            value = encode_output(job.doc, entities, self.tagger.name, self.tagger.version)
        except (ValueError, TypeError, RecursionError) as e:
            self._dead_letter(processing_error(src, e), job.value, job.key, job.headers,
                              job.timestamp_ms, job.partition)  # fmt: skip
            return
        record = OutRecord(value, job.key, job.headers)
        size, limit = record.size, self.limits.output
        if size > limit:
            detail = f"output is {size} bytes, limit {limit}"
            self._dead_letter(Rejection(RejectReason.OUTPUT_TOO_LARGE, detail, src), job.value,
                              job.key, job.headers, job.timestamp_ms, job.partition)  # fmt: skip
            return
        try:
            future = self._send(self.cfg.output_topic, record)
        except Exception as e:
            if not is_record_error(e):
                raise
            self._output_failed(job, e)
            return
        self._on_delivery(future, (src.topic, src.partition), src.offset, job.timestamp_ms,
                          output=True, job=job, part=job.partition)  # fmt: skip
        self.metrics.stage["produce"].observe(time.perf_counter() - t0)

    # ---------------------------------------------------------------- shutdown

    def _shutdown(self) -> int:
        """Finish the batches in flight, flush, commit; bounded by the shutdown timeout."""
        deadline = self.clock() + self.cfg.shutdown_timeout_s
        log.info("shutting down: finishing %d queued documents", self.work.qsize())
        try:
            assigned = list(self.consumer.assignment())
            if assigned:
                self.consumer.pause(*assigned)
        except Exception as e:
            log.warning("pause on shutdown failed: %s", e)
        self.overflow.clear()  # not started: the next owner reads them again
        if self._tagging.is_alive():
            self._put_stop(deadline)
            self._tagging.join(timeout=max(0.0, deadline - self.clock()))
        try:
            self.producer.flush(timeout=max(0.1, deadline - self.clock()))
        except Exception as e:
            log.warning("flush on shutdown failed: %s", e)
        self._apply_acks()
        self._commit()
        left = self.tracker.in_flight()
        if left:
            log.warning("%d documents not acknowledged in time; they will be reprocessed", left)
        try:
            self.consumer.close(autocommit=False)
        except Exception as e:
            log.warning("closing the consumer failed: %s", e)
        try:
            self.producer.close(timeout=max(0.1, deadline - self.clock()))
        except Exception as e:
            log.warning("closing the producer failed: %s", e)
        if self.fatal is not None:
            log.error("stopped on a fatal error: %s", self.fatal)
            return 1
        if not self._tagging.is_alive() and left == 0:
            log.info("shutdown complete")
        return 0

    def _put_stop(self, deadline: float) -> None:
        while self.clock() < deadline:
            try:
                self.work.put(_STOP, timeout=0.1)
                return
            except queue.Full:
                continue
