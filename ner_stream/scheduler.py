"""When which parts of which documents go to the model: the tagging stage's decisions, pure.

A document's windows are cut into *pieces* of at most half a micro-batch (`pieces_of`). A document
of one piece joins the open micro-batch (`batching.MicroBatcher`); the pieces of a longer one wait
in a lane of their own and join batches one at a time, so that a huge document shares the model
with the documents behind it instead of stalling them. `Scheduler` says when a batch goes, and how
long the tagging thread may wait for more work; `Backpressure` says when the consumer pauses. Both
take the time as an argument and hold no threads: the worker (`ner_stream.worker`) drives them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ner_stream.batching import BatchLimits, MicroBatcher

# How often the tagging thread looks for a finished pass while the model is busy, and how long it
# waits for work when there is nothing to do, in seconds.
MODEL_POLL_S = 0.002
IDLE_POLL_S = 0.05
# Passes submitted and not answered: the one the model runs and one waiting behind it, so that the
# model never waits for the tagging thread, and a batch keeps growing while the model is busy.
MAX_PASSES_IN_FLIGHT = 2


class Tracked(Protocol):
    """A document in the tagging stage, as the scheduler sees it."""

    @property
    def live(self) -> bool:
        """False once its partition is revoked or it was dead-lettered: no more work for it."""
        ...


@dataclass(eq=False)
class Piece:
    """A run of one document's windows (indices into its windows) that go into one micro-batch."""

    job: Tracked
    windows: list[int]
    tokens: int


def pieces_of(job: Tracked, window_lengths: Sequence[int], budget: int) -> list[Piece]:
    """A document's windows cut into pieces of at most `budget` tokens (a longer window is a piece
    on its own). A document without windows is one empty piece, so that it still gets an output.
    """
    if not window_lengths:
        return [Piece(job, [], 0)]
    pieces: list[Piece] = []
    current: list[int] = []
    tokens = 0
    for i, n in enumerate(window_lengths):
        if current and tokens + n > budget:
            pieces.append(Piece(job, current, tokens))
            current, tokens = [], 0
        current.append(i)
        tokens += n
    pieces.append(Piece(job, current, tokens))
    return pieces


class Scheduler:
    """Forms micro-batches of pieces under `BatchLimits` and decides when each goes to the model.

    - A batch goes as soon as it is full, or when the worker is stopping.
    - While the model is busy, a batch keeps growing past its wait limit, up to full: under load the
      batches grow and the model works on large ones. When the model is free, the wait limit
      decides, so light load keeps low latency.
    - The pieces of a long document join batches one at a time: one rides along with each batch
      that goes, and one goes alone when the model is free and no new work came.
    - Pieces of documents no longer `live` are dropped when their batch is taken.
    """

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        # A long document takes at most half a micro-batch, so that the other half serves the
        # documents queued behind it.
        self.piece_tokens = max(1, limits.max_tokens // 2)
        self._batcher: MicroBatcher[Piece] = MicroBatcher(limits)
        self._long: deque[Piece] = deque()

    def __len__(self) -> int:
        """Pieces waiting (in the open batch and the long lane)."""
        return len(self._batcher) + len(self._long)

    def add(self, pieces: list[Piece], now: float) -> list[Piece] | None:
        """Queue one document's pieces (see `pieces_of`) at `now` (seconds).

        Returns a batch that must go now: the open one, when this document does not fit in it.
        """
        if len(pieces) > 1:
            self._long.extend(pieces)
            return None
        (piece,) = pieces
        full = None
        if not self._batcher.fits(piece.tokens):
            full = self._live(self._batcher.take())
        self._batcher.add(piece, piece.tokens, now)
        return full or None

    def take(self, now: float, model_free: bool, idle: bool, stopping: bool) -> list[Piece] | None:
        """The batch to submit now, or None (see the class docstring).

        `model_free`: no pass is in the model; `idle`: no new document came since the last call;
        `stopping`: no more will come.
        """
        batcher = self._batcher
        if not (
            batcher.full()
            or (stopping and (len(batcher) or self._long))
            or (model_free and (batcher.due(now) or (self._long and idle)))
        ):
            return None
        pieces = batcher.take()
        if self._long:
            pieces.append(self._long.popleft())
        return self._live(pieces) or None

    def wait_s(self, now: float, model_free: bool) -> float:
        """How long the tagging thread may wait for new work before calling `take` again."""
        if not model_free:
            return MODEL_POLL_S
        if self._long:
            return 0.0
        left = self._batcher.time_left(now)
        return IDLE_POLL_S if left is None else left

    @staticmethod
    def _live(pieces: list[Piece]) -> list[Piece]:
        return [p for p in pieces if p.job.live]


def must_wait(passes_in_flight: int) -> bool:
    """Whether the oldest pass must be finished before another is submitted."""
    return passes_in_flight > MAX_PASSES_IN_FLIGHT


class Backpressure:
    """Whether the consumer's partitions are paused.

    They pause while consumed documents wait for room in the work queue (`capacity` documents), and
    resume once none waits and the queue has drained to half: resuming at the first free slot would
    pause again at once, one fetch later.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.paused = False

    def update(self, waiting: int, queued: int) -> bool | None:
        """True: pause now; False: resume now; None: no change. `waiting`: documents consumed but
        not yet queued; `queued`: documents in the work queue."""
        if waiting and not self.paused:
            self.paused = True
            return True
        if self.paused and not waiting and queued <= self.capacity // 2:
            self.paused = False
            return False
        return None
