"""The Kafka loop: consume -> decode -> prepare -> queue; acknowledge -> commit; rebalances.

Two threads share the work:

- the consumer thread (the caller of `Worker.run`, this module) owns the consumer: it polls,
  decodes and prepares each record (tokenize, split, windows, encode), hands documents to the
  tagging thread through a bounded queue, sends the dead letters of records that cannot be tagged,
  applies acknowledgements and commits (`ner_stream.delivery`). When the queue is full it pauses
  its partitions and keeps polling, so the group never expels it (`scheduler.Backpressure`). The
  rebalance listener runs here too;
- the tagging thread (`ner_stream.tagging`) forms micro-batches, runs them through the tagger and
  sends the outputs, and restarts a model process that dies.

Either thread can set `fatal` (through `Delivery.fatal`); the worker then stops, flushes and
commits what is acknowledged, and exits 1.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from kafka import ConsumerRebalanceListener
from kafka.errors import AuthorizationError

from ner_stream.batching import BatchLimits
from ner_stream.config import WorkerConfig
from ner_stream.delivery import Consumed, Delivery, Job, Partition, ProducerLike, TopicPartition
from ner_stream.kafka_io import ConsumerLike, InputConsumer, SizeLimits, explain
from ner_stream.messages import (
    Rejection,
    Source,
    carried_headers,
    decode,
    processing_error,
)
from ner_stream.metrics import Health, Metrics
from ner_stream.model_process import RestartWindow
from ner_stream.scheduler import Backpressure, Scheduler
from ner_stream.tagger import Tagger
from ner_stream.tagging import STOP, Swaps, TaggingStage
from ner_stream.transactions import TransactionalDelivery

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0  # how often the lag gauges are refreshed


class WorkQueue(queue.Queue):
    """The documents on their way from the consumer thread to the tagging thread: at most
    `maxsize` of them, and `tokens`, the tokens of the `Job`s in it, kept as they come and go
    (under the queue's own lock), for the consumer thread's token budget."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.tokens = 0

    def _put(self, item: Any) -> None:
        super()._put(item)
        self.tokens += item.tokens if isinstance(item, Job) else 0

    def _get(self) -> Any:
        item = super()._get()
        self.tokens -= item.tokens if isinstance(item, Job) else 0
        return item


class Worker(ConsumerRebalanceListener):
    """Runs the flow until `stop` is set; see the module docstring.

    It is its own rebalance listener: kafka-python's `subscribe` accepts only instances of
    `ConsumerRebalanceListener` (a TypeError otherwise).

    `restart_model` starts a fresh model process in place of one that died (raising
    `ModelProcessError` if it cannot); without it a dead model process stops the worker.
    `restarts` decides how often that may happen (default: `RestartWindow()`). `swaps` hands
    over new models to swap in while running (`model_swap.ModelSwapper`). `new_producer`
    (exactly-once) makes a fresh transactional producer when the one in use cannot go on (see
    `transactions.TransactionalDelivery._renew_producer`).
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
        swaps: Swaps | None = None,
        new_producer: Callable[[], Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.consumer = InputConsumer(consumer)
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        self.clock = clock
        self.partitions: dict[TopicPartition, Partition] = {}
        limits = limits or SizeLimits.of_producer(cfg)
        if cfg.exactly_once:
            self.delivery: Delivery = TransactionalDelivery(
                cfg, producer, self.consumer, self.metrics, limits, self.partitions.get,
                self._restart_partitions, clock, new_producer,
            )  # fmt: skip
        else:
            self.delivery = Delivery(cfg, producer, self.consumer, self.metrics, limits,
                                     self.partitions.get, clock)  # fmt: skip
        self.work = WorkQueue(cfg.queue_docs)
        # Consumed, waiting for room in the work queue, in order: kept as records, decoded and
        # tokenized only when they get room, since a tokenized document takes about 250 bytes a
        # token (a 1 MiB document some 50 MiB) and a fetch can bring hundreds.
        self.overflow: deque[tuple[Any, Partition]] = deque()
        self.backpressure = Backpressure(cfg.queue_docs, cfg.queue_tokens)
        self.scheduler = Scheduler(
            BatchLimits(cfg.max_batch_docs, cfg.max_batch_tokens, cfg.max_wait_ms / 1000),
            growth=cfg.max_batch_growth,
        )
        self._last_lag = clock() - LAG_INTERVAL_S
        self.tagging = TaggingStage(tagger, self.work, self.scheduler, self.delivery, self.metrics,
                                    self.health, clock, restart_model,
                                    restarts or RestartWindow(), swaps)  # fmt: skip
        self._tagging = threading.Thread(target=self.tagging.run, name="tagging", daemon=True)
        self.health.model_loaded = True
        self.metrics.model.info(tagger.labels())

    @property
    def fatal(self) -> BaseException | None:
        """The error that stops the worker, from either thread or a delivery report."""
        return self.delivery.fatal

    @fatal.setter
    def fatal(self, error: BaseException | None) -> None:
        self.delivery.fatal = error

    # ---------------------------------------------------------------- consumer thread

    def run(self, stop: threading.Event) -> int:
        """Consume until `stop` is set or a fatal error; returns the process exit code."""
        self.consumer.subscribe(self.cfg.input_topic, listener=self)
        self._tagging.start()
        try:
            while not stop.is_set() and self.fatal is None and self._tagging.is_alive():
                self._step()
        except AuthorizationError as e:
            # The consumer raises a missing ACL (on the group, say) from poll; waiting does not
            # grant it. Stopping like on any fatal error commits nothing past what is delivered.
            self.fatal = e
        finally:
            code = self._shutdown()
        return code

    def _step(self) -> None:
        self.delivery.apply_acks()
        self._drain_overflow()
        self._apply_backpressure()
        for record in self.consumer.poll(100, self.cfg.max_batch_docs * 4):
            self._consume(record)
        now = self.clock()
        self.delivery.tick(now)
        if now - self._last_lag >= LAG_INTERVAL_S:
            for (topic, partition), lag in self.consumer.lag().items():
                self.metrics.lag.labels(topic, str(partition)).set(lag)
            self._last_lag = now
        self.metrics.queue_depth.set(self.work.qsize() + len(self.overflow))
        self.metrics.in_flight.set(self.delivery.in_flight())
        self.health.progressed()

    def _consume(self, record: Any) -> None:
        tp = (record.topic, record.partition)
        part = self.partitions.get(tp)
        if part is None or not part.active:
            # A record fetched before a revoke: its new owner will read it again.
            return
        self.delivery.track(tp, record.offset)
        if self.overflow or not self._has_room():
            self.overflow.append((record, part))
            return
        self._admit(record, part)

    def _has_room(self) -> bool:
        """Whether the work queue takes another document: fewer than --queue-docs in it, and
        fewer tokens than --queue-tokens (so one document larger than that still goes, alone)."""
        return not self.work.full() and self.work.tokens < self.cfg.queue_tokens

    def _admit(self, record: Any, part: Partition) -> None:
        """Decode and tokenize a record that has room in the work queue, and queue it (or send
        its dead letter)."""
        source = Source(record.topic, record.partition, record.offset)
        # Null header values become empty ones here, once, for the output and the dead letter.
        consumed = Consumed(record.value, record.key, carried_headers(list(record.headers or [])),
                            record.timestamp, part)  # fmt: skip
        t0 = time.perf_counter()
        decoded = decode(record.value, record.key, source, self.cfg.max_doc_bytes)
        self.metrics.stage["decode"].observe(time.perf_counter() - t0)
        if isinstance(decoded, Rejection):
            self.delivery.dead_letter(decoded, consumed)
            return
        t1 = time.perf_counter()
        try:
            # The model serving now (it may have been swapped since the start).
            prepared = self.tagging.tagger.prepare(decoded.text)
        except Exception as e:  # one bad document must not stop the stream
            log.exception("tokenizing %s failed", decoded.id)
            self.delivery.dead_letter(processing_error(source, e), consumed)
            return
        self.metrics.stage["tokenize"].observe(time.perf_counter() - t1)
        job = Job(decoded, prepared, consumed, queued_at=self.clock(), tokens=prepared.num_tokens)
        # Never full: the caller checked for room, and only this thread puts.
        self.work.put_nowait(job)

    def _drain_overflow(self) -> None:
        while self.overflow and self._has_room():
            record, part = self.overflow.popleft()
            if part.active:
                self._admit(record, part)

    def _apply_backpressure(self) -> None:
        """Pause every owned partition while work is waiting for room; resume when drained."""
        # Finished records that exactly-once holds back, behind a slower earlier one of their
        # partition, count too: reading on would only grow that pile.
        held = self.delivery.held()
        change = self.backpressure.update(
            len(self.overflow) + max(0, held - self.cfg.queue_docs),
            self.work.qsize() + held,
            self.work.tokens,
        )
        if change is True:
            log.debug("backpressure: paused %d partitions", self.consumer.pause())
        elif change is False:
            log.debug("backpressure: resumed %d partitions", self.consumer.resume())
        paused = len(self.partitions) if self.backpressure.paused else 0
        self.metrics.paused.set(paused)

    # ---------------------------------------------------------------- rebalance listener

    def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        """Stop work for the revoked partitions and commit what is done for them."""
        self._release(revoked, lost=False)

    def on_partitions_lost(self, lost: Iterable[Any]) -> None:
        """Removed from the group (silent past the session timeout): the partitions may be
        another worker's already. Their work stops as on a revoke, but an open transaction is
        aborted rather than committed (at least once, the commit is tried: the broker refuses it
        if the generation has ended, and the next owner repeats that work)."""
        self._release(lost, lost=True)

    def _release(self, partitions: Iterable[Any], lost: bool) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions]
        if not tps:
            return
        self.metrics.rebalances.labels("lost" if lost else "revoked").inc()
        for tp in tps:
            part = self.partitions.pop(tp, None)
            if part is not None:
                part.active = False
        # Not started: the partitions' next owner reads them again.
        self.overflow = deque(w for w in self.overflow if w[1].active)
        if lost:
            self.delivery.on_lost(tps)
        else:
            self.delivery.on_revoked(tps)
        for tp in tps:
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(tp[0], str(tp[1]))
        self._assigned_changed()
        log.info("partitions %s: %s", "lost" if lost else "revoked", sorted(tps))

    def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        """Start tracking the new partitions from their committed offsets."""
        assigned = list(assigned)
        tps = [(tp.topic, tp.partition) for tp in assigned]
        self.metrics.rebalances.labels("assigned").inc()
        for tp in tps:
            self.partitions[tp] = Partition(tp)
        self.delivery.on_assigned(tps)
        if self.backpressure.paused:
            self.consumer.pause(assigned)
        self._assigned_changed()
        log.info("partitions assigned: %s", sorted(tps))

    def _restart_partitions(self, tps: list[TopicPartition]) -> None:
        """Drop the work in progress of `tps`, which were rewound to their committed offsets
        (an aborted transaction): their records are read again under new `Partition` objects."""
        for tp in tps:
            old = self.partitions.get(tp)
            if old is not None:
                old.active = False
                self.partitions[tp] = Partition(tp)
        log.info("dropped the work in progress of %d partitions after an abort", len(tps))

    def _assigned_changed(self) -> None:
        self.health.assigned = len(self.partitions)
        self.metrics.assigned.set(len(self.partitions))

    # ---------------------------------------------------------------- shutdown

    def _shutdown(self) -> int:
        """Finish the batches in flight, flush, commit; bounded by the shutdown timeout."""
        deadline = self.clock() + self.cfg.shutdown_timeout_s
        log.info("shutting down: finishing %d queued documents", self.work.qsize())
        try:
            self.consumer.pause()
        except Exception as e:
            log.warning("pause on shutdown failed: %s", e)
        self.overflow.clear()  # not started: the next owner reads them again
        if self._tagging.is_alive():
            self._put_stop(deadline)
            self._tagging.join(timeout=max(0.0, deadline - self.clock()))
        left = self.delivery.finish(deadline)
        try:
            self.consumer.close()
        except Exception as e:
            log.warning("closing the consumer failed: %s", e)
        self.delivery.close(deadline)
        if self.fatal is not None:
            log.error("stopped on a fatal error: %s", explain(self.fatal, self.cfg))
            return 1
        if not self._tagging.is_alive() and left == 0:
            log.info("shutdown complete")
        return 0

    def _put_stop(self, deadline: float) -> None:
        while self.clock() < deadline:
            try:
                self.work.put(STOP, timeout=0.1)
                return
            except queue.Full:
                continue
