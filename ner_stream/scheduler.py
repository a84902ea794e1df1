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
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

from ner_stream.batching import BatchLimits, MicroBatcher

# How often the tagging thread looks for a finished pass while the model is busy, and how long it
# waits for work when there is nothing to do, in seconds.
MODEL_POLL_S = 0.002
IDLE_POLL_S = 0.05
# Long documents the lane may hold before the caller takes no more work: one being tagged, and
# the next, so that short documents keep flowing beside a long one while memory stays bounded.
MAX_LONG_DOCUMENTS = 2
# Micro-batches submitted and not answered: the one the model runs and one waiting behind it, so
# that the model never waits for the tagging thread, and the next batch keeps growing while the
# model is busy.
MAX_BATCHES_IN_FLIGHT = 2


class Tracked(Protocol):
    """A document in the tagging stage, as the scheduler sees it."""

    @property
    def live(self) -> bool:
        """False once its partition is revoked or it was dead-lettered: no more work for it."""
        ...


J = TypeVar("J", bound=Tracked)


@dataclass(eq=False)
class Piece(Generic[J]):
    """A run of one document's windows (indices into its windows) that go into one micro-batch,
    and their tokens."""

    job: J
    windows: list[int]
    tokens: int


def pieces_of(job: J, window_lengths: Sequence[int], budget: int) -> list[Piece[J]]:
    """A document's windows (their lengths in tokens) cut into pieces of at most `budget` tokens;
    a longer window is a piece on its own. A document without windows is one empty piece, so that
    it still gets an output.
    """
    if not window_lengths:
        return [Piece(job, [], 0)]
    pieces: list[Piece[J]] = []
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


class Scheduler(Generic[J]):
    """Forms micro-batches of pieces under `BatchLimits` and decides when each goes to the model.

    Times are seconds of one monotonic clock, passed by the caller.

    - A micro-batch never holds more than `max_docs` pieces or `max_tokens` tokens, the piece of
      a long document that rides along included.
    - A batch goes as soon as it is full, or when the worker is stopping.
    - While the model is busy, a batch keeps growing past its wait limit, up to full: under load
      the batches grow and the model works on large ones. When the model is free, the wait limit
      decides, so light load keeps low latency.
    - While the model holds `MAX_BATCHES_IN_FLIGHT` batches (a backlog: the next could not run
      before one of them is done anyway), full means `growth` times the limits' documents and
      tokens (`in_model` tells the count). Batches are then larger where the model is the limit,
      and a document costs less in a larger pass; once a batch leaves the model, the open one
      goes as soon as it holds the limits' plain size.
    - The pieces of a document longer than `piece_tokens` (half a micro-batch) wait in a lane of
      their own and join batches one at a time: the next one rides along with each batch that
      goes (room is kept for it in the open batch), one goes alone when the model is free and no
      new work came, and one that does not fit beside a batch goes alone right after it. A long
      document thus gets a pass at least every other batch, however busy the stream.
    - While the lane holds `MAX_LONG_DOCUMENTS` documents, `accepts` is False: the caller takes
      no more documents, so that backpressure bounds long documents too.
    - Pieces of documents no longer `live` are dropped when their batch is taken.
    """

    def __init__(self, limits: BatchLimits, growth: int = 1) -> None:
        if growth < 1:
            raise ValueError(f"growth must be at least 1, got {growth}")
        self.base = limits
        self._grown = replace(
            limits, max_docs=limits.max_docs * growth, max_tokens=limits.max_tokens * growth
        )
        # A long document takes at most half a micro-batch, so that the other half serves the
        # documents queued behind it.
        self.piece_tokens = max(1, limits.max_tokens // 2)
        self._batcher: MicroBatcher[Piece[J]] = MicroBatcher(limits)
        self._long: deque[Piece[J]] = deque()
        self._long_docs = 0  # documents with pieces in the lane
        self._head_owed = False  # the lane's next piece was passed over by the last batch

    def __len__(self) -> int:
        """Pieces waiting (in the open batch and the long lane)."""
        return len(self._batcher) + len(self._long)

    @property
    def limits(self) -> BatchLimits:
        """The limits in force: `base`, or grown while the model holds a backlog."""
        return self._batcher.limits

    def in_model(self, batches: int) -> None:
        """Tell how many batches the model holds (submitted, not answered): the limits in force
        follow (see the class docstring)."""
        self._batcher.limits = self._grown if batches >= MAX_BATCHES_IN_FLIGHT else self.base

    def accepts(self) -> bool:
        """Whether the caller may add another document now (see the class docstring)."""
        return self._long_docs < MAX_LONG_DOCUMENTS

    def add(self, pieces: list[Piece[J]], now: float) -> list[Piece[J]] | None:
        """Queue one document's pieces (see `pieces_of`) at `now`.

        Returns a batch that must go now: the open one, when it is full or this document does not
        fit in it.
        """
        if len(pieces) > 1:
            self._long.extend(pieces)
            self._long_docs += 1
            return None
        (piece,) = pieces
        out = None
        docs, tokens = self._reserved()
        if len(self._batcher) and (
            self._batcher.full(docs, tokens) or not self._batcher.fits(piece.tokens, tokens)
        ):
            out = self._take()
        self._batcher.add(piece, piece.tokens, now)
        return out

    def take(
        self, now: float, model_free: bool, idle: bool, stopping: bool
    ) -> list[Piece[J]] | None:
        """The batch to submit at `now`, or None (see the class docstring).

        `model_free`: no batch is in the model; `idle`: no new document came since the last call;
        `stopping`: no more will come.
        """
        if self._head_owed and self._long:
            self._head_owed = False
            return [p for p in [self._pop_head()] if p.job.live] or None
        batcher = self._batcher
        full = len(batcher) and batcher.full(*self._reserved())
        if not (
            full
            or (stopping and len(self))
            or (model_free and (batcher.due(now) or (self._long and idle)))
        ):
            return None
        return self._take()

    def wait_s(self, now: float, model_free: bool) -> float:
        """Seconds the tagging thread may wait for new work before calling `take` again."""
        if not model_free:
            return MODEL_POLL_S
        if self._long:
            return 0.0
        left = self._batcher.time_left(now)
        return IDLE_POLL_S if left is None else left

    def long_jobs(self) -> list[J]:
        """The documents with pieces in the long lane, in lane order."""
        return list({id(p.job): p.job for p in self._long}.values())

    def put_back(self, pieces: list[Piece[J]]) -> None:
        """Queue again, in order, pieces of a document that still has pieces in the long lane,
        just ahead of them: pieces already tagged, to be tagged again (by a new model, so that
        one document's entities all come from one model).

        Raises ValueError when the lane holds no piece of their document.
        """
        if not pieces:
            return
        job = pieces[0].job
        at = next((i for i, p in enumerate(self._long) if p.job is job), None)
        if at is None or any(p.job is not job for p in pieces):
            raise ValueError("pieces go back only beside the rest of their document")
        for offset, piece in enumerate(pieces):
            self._long.insert(at + offset, piece)

    def must_wait(self, batches_in_flight: int) -> bool:
        """Whether the oldest batch in the model must be finished before another is submitted."""
        return batches_in_flight > MAX_BATCHES_IN_FLIGHT

    def _reserved(self) -> tuple[int, int]:
        """Documents and tokens kept free in the open batch for the long lane's next piece: none
        when it could not share a batch anyway (one document per batch, or a piece of a window
        longer than half a batch), so that batches are not shrunk for nothing."""
        if not self._long or self.limits.max_docs < 2:
            return (0, 0)
        head = self._long[0].tokens
        return (1, head) if head <= self.piece_tokens else (0, 0)

    def _pop_head(self) -> Piece[J]:
        head = self._long.popleft()
        if not self._long or self._long[0].job is not head.job:
            self._long_docs -= 1  # its last piece has left the lane
        return head

    def _take(self) -> list[Piece[J]] | None:
        """The open batch, with the long lane's next piece when it fits; None if nothing live."""
        limits = self.limits
        tokens = self._batcher.tokens
        pieces = self._batcher.take()
        if self._long:
            head = self._long[0]
            if not pieces or (
                len(pieces) < limits.max_docs and tokens + head.tokens <= limits.max_tokens
            ):
                pieces.append(self._pop_head())
            else:
                self._head_owed = True
        return [p for p in pieces if p.job.live] or None


class Backpressure:
    """Whether the consumer's partitions are paused.

    They pause while consumed documents wait for room in the work queue (`capacity` documents,
    and `token_capacity` tokens when given), and resume once none waits and the queue has
    drained to half of both: resuming at the first free slot would pause again at once, one
    fetch later.
    """

    def __init__(self, capacity: int, token_capacity: int | None = None) -> None:
        self.capacity = capacity
        self.token_capacity = token_capacity
        self.paused = False

    def update(self, waiting: int, queued: int, queued_tokens: int = 0) -> bool | None:
        """True: pause now; False: resume now; None: no change. `waiting`: documents consumed but
        not yet queued; `queued`: documents in the work queue; `queued_tokens`: their tokens."""
        if waiting and not self.paused:
            self.paused = True
            return True
        drained = queued <= self.capacity // 2 and (
            self.token_capacity is None or queued_tokens <= self.token_capacity // 2
        )
        if self.paused and not waiting and drained:
            self.paused = False
            return False
        return None
