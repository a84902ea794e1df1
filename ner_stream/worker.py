"""The Kafka loop: consume -> decode -> prepare -> schedule -> tag -> deliver -> commit.

Two threads share the work:

- the consumer thread (the caller of `Worker.run`) owns the consumer: it polls, decodes and
  prepares each record (tokenize, split, windows, encode), hands documents to the tagging thread
  through a bounded queue, sends the dead letters of records that cannot be tagged, applies
  acknowledgements and commits (`ner_stream.delivery`). When the queue is full it pauses its
  partitions and keeps polling, so the group never expels it (`scheduler.Backpressure`);
- the tagging thread forms micro-batches and decides when each goes (`scheduler.Scheduler`),
  submits them to the tagger's runner (`ner_stream.runner`; with a model process, the default on
  the CPU, the passes run there while this thread turns the previous pass's tags into entities and
  sends the outputs).

When the model process dies (killed for memory, a native crash), the tagging thread starts a
fresh one and runs the documents of the passes it lost one at a time; a document that kills the
model again on its own goes to the dead-letter topic (`model_crash`) and the stream goes on. Deaths
more frequent than `RestartWindow` allows, or a model process that cannot start again, stop the
worker (exit code 1) without committing the documents it had.
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

from ner_stream.batching import BatchLimits
from ner_stream.config import WorkerConfig
from ner_stream.delivery import Consumed, Delivery, Job, Partition, ProducerLike, TopicPartition
from ner_stream.kafka_io import ConsumerLike, InputConsumer, SizeLimits
from ner_stream.messages import (
    Entity,
    Rejection,
    RejectReason,
    Source,
    carried_headers,
    decode,
    processing_error,
)
from ner_stream.metrics import Health, Metrics
from ner_stream.model_process import ModelProcessError, RestartWindow
from ner_stream.scheduler import Backpressure, Piece, Scheduler, must_wait, pieces_of
from ner_stream.tagger import BatchStats, PendingTags, PreparedDoc, Tagger

log = logging.getLogger(__name__)

_STOP = object()
LAG_INTERVAL_S = 5.0  # how often the lag gauges are refreshed
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
        self.tagger = tagger
        self.consumer = InputConsumer(consumer)
        self.producer = producer
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        self.clock = clock
        self.partitions: dict[TopicPartition, Partition] = {}
        self.delivery = Delivery(cfg, producer, self.consumer, self.metrics,
                                 limits or SizeLimits.of_producer(cfg), self.partitions.get,
                                 clock)  # fmt: skip
        self.work: queue.Queue = queue.Queue(maxsize=cfg.queue_docs)
        self.overflow: deque[Job] = deque()  # consumed but the queue was full, in order
        self.backpressure = Backpressure(cfg.queue_docs)
        self.scheduler = Scheduler(
            BatchLimits(cfg.max_batch_docs, cfg.max_batch_tokens, cfg.max_wait_ms / 1000)
        )
        self._last_lag = clock() - LAG_INTERVAL_S
        self._tagging = threading.Thread(target=self._tagging_loop, name="tagging", daemon=True)
        # Submitted to the runner, oldest first; only the tagging thread touches it.
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
        finally:
            code = self._shutdown()
        return code

    def _step(self) -> None:
        self.delivery.apply_acks()
        self._drain_overflow()
        self._apply_backpressure()
        for record in self.consumer.poll(100, self.cfg.max_batch_docs * 4):
            self._consume(record)
        self.delivery.apply_acks()
        now = self.clock()
        if self.delivery.commit_due(now):
            self.delivery.commit()
        if now - self._last_lag >= LAG_INTERVAL_S:
            for (topic, partition), lag in self.consumer.lag().items():
                self.metrics.lag.labels(topic, str(partition)).set(lag)
            self._last_lag = now
        self.metrics.queue_depth.set(self.work.qsize() + len(self.overflow))
        self.metrics.in_flight.set(self.delivery.tracker.in_flight())
        self.health.progressed()

    def _consume(self, record: Any) -> None:
        tp = (record.topic, record.partition)
        part = self.partitions.get(tp)
        if part is None or not part.active:
            # A record fetched before a revoke: its new owner will read it again.
            return
        self.delivery.track(tp, record.offset)
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
            prepared = self.tagger.prepare(decoded.text)
        except Exception as e:  # one bad document must not stop the stream
            log.exception("tokenizing %s failed", decoded.id)
            self.delivery.dead_letter(processing_error(source, e), consumed)
            return
        self.metrics.stage["tokenize"].observe(time.perf_counter() - t1)
        job = Job(decoded, prepared, consumed, queued_at=self.clock())
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

    def _apply_backpressure(self) -> None:
        """Pause every owned partition while work is waiting for room; resume when drained."""
        change = self.backpressure.update(len(self.overflow), self.work.qsize())
        if change is True:
            log.debug("backpressure: paused %d partitions", self.consumer.pause())
        elif change is False:
            log.debug("backpressure: resumed %d partitions", self.consumer.resume())
        paused = len(self.partitions) if self.backpressure.paused else 0
        self.metrics.paused.set(paused)

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
        # Not started: the partitions' next owner reads them again.
        self.overflow = deque(j for j in self.overflow if j.live)
        # Outputs already sent are worth committing: wait for their acknowledgements.
        try:
            self.producer.flush(timeout=min(10.0, self.cfg.shutdown_timeout_s))
        except Exception as e:
            log.warning("flush on revoke failed: %s", e)
        self.delivery.apply_acks()
        self.delivery.commit(only=tps)
        for tp in tps:
            self.delivery.revoke(tp)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(tp[0], str(tp[1]))
        self._assigned_changed()
        log.info("partitions revoked: %s", sorted(tps))

    def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        """Start tracking the new partitions from their committed offsets."""
        assigned = list(assigned)
        tps = [(tp.topic, tp.partition) for tp in assigned]
        self.metrics.rebalances.labels("assigned").inc()
        for tp in tps:
            self.partitions[tp] = Partition(tp)
            self.delivery.tracker.revoke(tp)  # start afresh at the first record consumed
        if self.backpressure.paused:
            self.consumer.pause(assigned)
        self._assigned_changed()
        log.info("partitions assigned: %s", sorted(tps))

    def _assigned_changed(self) -> None:
        self.health.assigned = len(self.partitions)
        self.metrics.assigned.set(len(self.partitions))

    # ---------------------------------------------------------------- tagging thread

    def _tagging_loop(self) -> None:
        try:
            self._tag_until_stopped()
        except BaseException as e:  # the consumer thread sees it and shuts down
            log.exception("the tagging stage failed")
            self.fatal = e

    def _tag_until_stopped(self) -> None:
        scheduler = self.scheduler
        stopping = False
        while True:
            if stopping:  # nothing more is coming: no reason to keep the model's queue full
                self._drain_model()
            # Passes whose results are in: the model may be free now, and the next batch goes to
            # it before this thread spends its time on their spans and outputs.
            finished = self._take_finished()
            model_free = not self._in_model
            wait = 0.0 if finished else scheduler.wait_s(self.clock(), model_free)
            job = None
            if not stopping:
                with contextlib.suppress(queue.Empty):
                    job = self.work.get(timeout=wait)
            if job is _STOP:
                stopping, job = True, None
            elif job is not None:
                lengths = [len(w) for w in job.prepared.windows]
                pieces = pieces_of(job, lengths, scheduler.piece_tokens)
                job.entities = [[] for _ in lengths]
                job.pieces_left = len(pieces)
                full = scheduler.add(pieces, self.clock())
                if full:
                    self._run_batch(full)
            batch = scheduler.take(self.clock(), model_free, idle=job is None, stopping=stopping)
            if batch:
                self._run_batch(batch)
            self._finish_done()
            if stopping and not len(scheduler):
                self._drain_model()
                return

    def _run_batch(self, pieces: list[Piece]) -> None:
        self.metrics.stage["batch_wait"].observe(
            max(0.0, self.clock() - min(p.job.queued_at for p in pieces))
        )
        windows = [(p.job.prepared, w) for p in pieces for w in p.windows]
        while True:
            try:
                pending = self.tagger.submit(windows)
                break
            except ModelProcessError as e:
                # The model died before this pass reached it: recover, then send it to the new
                # one (`_model_died` raises when the model cannot be restarted).
                self._model_died(e, [])
            except Exception:
                self._run_one_by_one(pieces)
                return
        self._in_model.append((pieces, pending))
        while must_wait(len(self._in_model)):
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
        """Entities and outputs of a submitted pass (waits for its result)."""
        try:
            per_window, stats = pending.result()
        except ModelProcessError as e:
            self._model_died(e, pieces)
            return
        except Exception:
            self._run_one_by_one(pieces)
            return
        self._apply(pieces, per_window, stats)

    def _apply(
        self, pieces: list[Piece], per_window: list[list[Entity]], stats: BatchStats
    ) -> None:
        """The entities of a pass (one list per window of `pieces`, in order) to their jobs."""
        self.metrics.observe_batch(len(pieces), stats.real_tokens, stats.batches)
        self.metrics.stage["inference"].observe(stats.inference_s)
        self.metrics.stage["spans"].observe(stats.spans_s)
        results = iter(per_window)
        for p in pieces:
            for w in p.windows:
                p.job.entities[w] = next(results)
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
                per_window, stats = pending.result()  # no waiting: answered, or lost already
            except Exception:
                suspects.extend(pieces)
            else:
                self._apply(pieces, per_window, stats)
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
            if not p.job.live:
                continue  # revoked (its next owner reads it again), or dead-lettered already
            try:
                per_window, _ = self.tagger.submit(
                    [(p.job.prepared, w) for w in p.windows]
                ).result()
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
            for w, ents in zip(p.windows, per_window, strict=True):
                p.job.entities[w] = ents
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
            self.tagger.submit([(self._probe_doc, 0)]).result()
        except ModelProcessError as e:
            raise ModelProcessError(
                f"the model process dies on any input (a one-word probe killed it too): {e}"
            ) from e
        except Exception:  # the model answered: it is alive, which is all the probe asks
            log.debug("the probe pass failed", exc_info=True)

    def _reject(self, piece: Piece, rejection: Rejection) -> None:
        """Dead-letter the document of `piece`; none of its pieces produces an output after."""
        piece.job.pieces_left = -1
        self.delivery.dead_letter(rejection, piece.job.record)

    def _piece_done(self, piece: Piece) -> None:
        job = piece.job
        if not job.live:
            return
        job.pieces_left -= 1
        if job.pieces_left == 0:
            self.delivery.output(job, self.tagger.name, self.tagger.version)

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
        try:
            self.producer.flush(timeout=max(0.1, deadline - self.clock()))
        except Exception as e:
            log.warning("flush on shutdown failed: %s", e)
        self.delivery.apply_acks()
        self.delivery.commit()
        left = self.delivery.tracker.in_flight()
        if left:
            log.warning("%d documents not acknowledged in time; they will be reprocessed", left)
        try:
            self.consumer.close()
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
