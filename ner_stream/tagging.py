"""The tagging thread: documents from the work queue -> micro-batches -> the tagger's runner ->
entities -> outputs.

`TaggingStage.run` takes the jobs the consumer thread queues, lets `scheduler.Scheduler` decide
which pieces go to the model and when, submits them (at most one micro-batch waits behind the
one the model runs, `Scheduler.must_wait`), puts the entities of each answered micro-batch into
their documents and hands every finished document to `delivery.Delivery.output`.

Between micro-batches it swaps in a new model that `model_swap.ModelSwapper` has loaded and
checked (`TaggingStage._swap_model`): the passes in flight finish on the old model, and a long
document that the old model had partly tagged is tagged again whole by the new one, so that every
output comes from one model and names it.

When the model process dies (killed for memory, a native crash), the stage starts a fresh one and
runs the documents of the passes it lost one at a time; a document that kills the model again on
its own goes to the dead-letter topic (`model_crash`) and the stream goes on. Deaths more frequent
than `RestartWindow` allows, or a model process that cannot start again, stop the worker (exit
code 1) without committing the documents it had.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ner_stream.delivery import Delivery
from ner_stream.messages import Entity, Rejection, RejectReason, processing_error
from ner_stream.metrics import Health, Metrics
from ner_stream.model_process import ModelProcessError, RestartWindow
from ner_stream.model_swap import Candidate
from ner_stream.runner import RunnerDied
from ner_stream.scheduler import Piece, Scheduler, pieces_of
from ner_stream.tagger import BatchStats, PendingTags, PreparedDoc, Tagger

log = logging.getLogger(__name__)

STOP = object()  # put on the work queue: nothing more is coming
# Tagged alone after a document killed the model alone: a model that dies on this too dies on
# anything, and the document is not to blame.
PROBE_TEXT = "probe"


class Swaps(Protocol):
    """Where checked models wait to be swapped in (`model_swap.ModelSwapper`)."""

    def take(self) -> Candidate | None:
        """The model waiting to be swapped in, if any."""
        ...

    def served(self, candidate: Candidate) -> None:
        """`candidate` was swapped in: the model it replaced may be closed."""
        ...


class TaggingStage:
    """The tagging thread's state and loop (see the module docstring).

    `restart_model` starts a fresh model process in place of one that died (raising
    `ModelProcessError` if it cannot); without it a dead model process stops the worker.
    `restarts` decides how often that may happen. `swaps` hands over new models to swap in.
    """

    def __init__(
        self,
        tagger: Tagger,
        work: queue.Queue,
        scheduler: Scheduler,
        delivery: Delivery,
        metrics: Metrics,
        health: Health,
        clock: Callable[[], float] = time.monotonic,
        restart_model: Callable[[], None] | None = None,
        restarts: RestartWindow | None = None,
        swaps: Swaps | None = None,
    ) -> None:
        self.tagger = tagger
        self.work = work
        self.scheduler = scheduler
        self.delivery = delivery
        self.metrics = metrics
        self.health = health
        self.clock = clock
        # Submitted to the runner, oldest first: a runner answers in the order it was given.
        self._in_model: deque[tuple[list[Piece], PendingTags]] = deque()
        # Answered (or lost with a dead model), taken off `_in_model`, not yet finished: kept
        # here rather than in a local list so that a model death can account for them.
        self._done: deque[tuple[list[Piece], PendingTags]] = deque()
        self._restart_model = restart_model
        self._restarts = restarts or RestartWindow()
        self._probe_doc: PreparedDoc | None = None
        self._swaps = swaps

    def run(self) -> None:
        """The tagging thread: until `STOP` is taken from the work queue and everything is
        finished. An error that escapes (the model cannot be restarted, the broker refuses an
        output) becomes `delivery.fatal`, which stops the worker."""
        try:
            self._tag_until_stopped()
        except BaseException as e:  # the consumer thread sees it and shuts down
            log.exception("the tagging stage failed")
            self.delivery.fatal = e

    def _tag_until_stopped(self) -> None:
        scheduler = self.scheduler
        stopping = False
        while True:
            if stopping:  # nothing more is coming: no reason to keep the model's queue full
                self._drain_model()
            elif self._swaps is not None:
                self._swap_model()
            # Passes whose results are in: the model may be free now, and the next batch goes to
            # it before this thread spends its time on their spans and outputs.
            finished = self._take_finished()
            model_free = not self._in_model
            scheduler.in_model(len(self._in_model))
            wait = 0.0 if finished else scheduler.wait_s(self.clock(), model_free)
            job = None
            if not stopping and scheduler.accepts():
                with contextlib.suppress(queue.Empty):
                    job = self.work.get(timeout=wait)
            elif not stopping and wait:
                # Long documents fill the scheduler: new work waits in the queue (and the consumer
                # pauses) until the model has taken some of theirs.
                time.sleep(wait)
            if job is STOP:
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

    def _swap_model(self) -> None:
        """Swap in the model waiting in `swaps`, if any: the passes in flight finish on the old
        model first, and long documents it partly tagged are tagged again whole by the new one."""
        assert self._swaps is not None
        candidate = self._swaps.take()
        if candidate is None:
            return
        try:
            self._drain_model()
        except BaseException:  # the old model failed for good: the worker stops
            candidate.close()
            raise
        old = self.tagger
        self.tagger = candidate.tagger
        # A model process that dies from now on is the new model's, restarted with the new model.
        self._restart_model = candidate.restart
        again = self._tag_again_whole()
        self.metrics.model.info(self.tagger.labels())
        self.metrics.swaps["swapped"].inc()
        self._swaps.served(candidate)
        log.info("model swapped: now serving %s %s from %s (was %s %s); %d partly tagged "
                 "documents are tagged again whole", self.tagger.name, self.tagger.version,
                 candidate.source, old.name, old.version, again)  # fmt: skip

    def _tag_again_whole(self) -> int:
        """Put the pieces that the old model tagged of documents still in the long lane back in
        the lane, for the new model; returns how many documents."""
        again = 0
        for job in self.scheduler.long_jobs():
            if not job.live:
                continue
            lengths = [len(w) for w in job.prepared.windows]
            pieces = pieces_of(job, lengths, self.scheduler.piece_tokens)
            done = pieces[: len(pieces) - job.pieces_left]
            if done:
                self.scheduler.put_back(done)
                job.pieces_left += len(done)
                again += 1
        return again

    def _run_batch(self, pieces: list[Piece]) -> None:
        self.metrics.stage["batch_wait"].observe(
            max(0.0, self.clock() - min(p.job.queued_at for p in pieces))
        )
        windows = [(p.job.prepared, w) for p in pieces for w in p.windows]
        while True:
            try:
                pending = self.tagger.submit(windows)
                break
            except RunnerDied as e:
                # The model died before this pass reached it: recover, then send it to the new
                # one (`_model_died` raises when the model cannot be restarted).
                self._model_died(e, [])
            except Exception:
                self._run_one_by_one(pieces)
                return
        self._in_model.append((pieces, pending))
        while self.scheduler.must_wait(len(self._in_model)):
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
            except RunnerDied as e:
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
        except RunnerDied as e:
            self._model_died(e, pieces)
            return
        except Exception:
            self._run_one_by_one(pieces)
            return
        self._apply(pieces, per_window, stats, pending.tagger)

    def _apply(
        self, pieces: list[Piece], per_window: list[list[Entity]], stats: BatchStats, tagger: Tagger
    ) -> None:
        """The entities of a pass (one list per window of `pieces`, in order) that `tagger` ran,
        to their jobs."""
        self.metrics.observe_batch(len(pieces), stats.real_tokens, stats.batches)
        self.metrics.stage["inference"].observe(stats.inference_s)
        self.metrics.stage["spans"].observe(stats.spans_s)
        results = iter(per_window)
        for p in pieces:
            for w in p.windows:
                p.job.entities[w] = next(results)
            self._piece_done(p, tagger)

    def _model_died(self, error: RunnerDied, lost: list[Piece]) -> None:
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
                self._apply(pieces, per_window, stats, pending.tagger)
        log.error("the model process died with %d documents in flight: %s",
                  len({id(p.job) for p in suspects}), error)  # fmt: skip
        self._restart(error)
        self._run_one_by_one(suspects, after_crash=True)

    def _restart(self, error: RunnerDied) -> None:
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
        except RunnerDied as e:
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
            tagger = self.tagger
            try:
                per_window, _ = tagger.submit([(p.job.prepared, w) for w in p.windows]).result()
            except RunnerDied as e:
                if not after_crash:
                    self._model_died(e, pieces[i:])
                    return
                self._restart(e)
                self._probe()
                detail = f"it stopped the model process twice, alone the second time: {e}"
                self._reject(p, Rejection(RejectReason.MODEL_CRASH, detail, p.job.doc.source))
                continue
            except Exception as e:
                log.exception("document %s failed", p.job.doc.id)
                self._check_runner(e)
                self._reject(p, processing_error(p.job.doc.source, e))
                continue
            for w, ents in zip(p.windows, per_window, strict=True):
                p.job.entities[w] = ents
            self._piece_done(p, tagger)

    def _probe(self) -> None:
        """Run a one-word pass in the restarted model; ModelProcessError if that kills it too.

        After a document killed the model alone: if a tiny pass kills it as well, the model dies
        on any input, and dead-lettering the document (and the next, and the next) would be
        wrong.
        """
        try:
            self._probe_pass()
        except RunnerDied as e:
            raise ModelProcessError(
                f"the model process dies on any input (a one-word probe killed it too): {e}"
            ) from e
        except Exception:  # the model answered: it is alive, which is all the probe asks
            log.debug("the probe pass failed", exc_info=True)

    def _probe_pass(self) -> None:
        """Tag a one-word document; raises what the runner raises."""
        if self._probe_doc is None:
            self._probe_doc = self.tagger.prepare(PROBE_TEXT)
        self.tagger.submit([(self._probe_doc, 0)]).result()

    def _check_runner(self, error: Exception) -> None:
        """After a document failed alone: raise (fatal to the worker) unless the runner still
        tags a one-word probe. A runner that fails on any input is broken, and dead-lettering
        every document (and committing them) would hide that."""
        try:
            self._probe_pass()
        except RunnerDied as e:
            # Dead just now: not a sign that it fails on any input. Restart it (fatal when it
            # cannot be) and settle what else it held; the document, which failed alone before,
            # is still dead-lettered by the caller.
            self._model_died(e, [])
        except Exception as e:
            raise RuntimeError(
                f"the runner fails on any input (a one-word probe failed too: {e}); "
                f"the document's error was: {error}"
            ) from e

    def _reject(self, piece: Piece, rejection: Rejection) -> None:
        """Dead-letter the document of `piece`; none of its pieces produces an output after."""
        piece.job.pieces_left = -1
        self.delivery.dead_letter(rejection, piece.job.record)

    def _piece_done(self, piece: Piece, tagger: Tagger) -> None:
        """`tagger` has tagged `piece`; the output goes once every piece of its document is."""
        job = piece.job
        if not job.live:
            return
        job.pieces_left -= 1
        if job.pieces_left == 0:
            self.delivery.output(job, tagger.name, tagger.version)
