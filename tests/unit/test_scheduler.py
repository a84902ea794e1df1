"""The tagging stage's decisions, step by step with a hand-driven clock: no threads, no model."""

from __future__ import annotations

from dataclasses import dataclass

from ner_stream.batching import BatchLimits
from ner_stream.scheduler import (
    IDLE_POLL_S,
    MODEL_POLL_S,
    Backpressure,
    Scheduler,
    pieces_of,
)


@dataclass(eq=False)
class Doc:
    name: str
    live: bool = True


def scheduler(max_docs: int = 4, max_tokens: int = 100, max_wait_s: float = 0.5) -> Scheduler:
    return Scheduler(BatchLimits(max_docs=max_docs, max_tokens=max_tokens, max_wait_s=max_wait_s))


def names(batch) -> list[str]:
    return [p.job.name for p in batch]


def add(s: Scheduler, name: str, lengths: list[int], now: float, live: bool = True):
    doc = Doc(name, live)
    return doc, s.add(pieces_of(doc, lengths, s.piece_tokens), now)


# ------------------------------------------------------------------------------------ pieces


def test_a_long_document_is_cut_into_pieces_of_at_most_the_budget():
    doc = Doc("long")
    pieces = pieces_of(doc, [30, 30, 30, 30, 10, 45], budget=60)
    assert [p.windows for p in pieces] == [[0, 1], [2, 3], [4, 5]]
    assert [p.tokens for p in pieces] == [60, 60, 55]
    assert all(p.job is doc for p in pieces)


def test_a_window_longer_than_the_budget_is_a_piece_of_its_own_and_no_window_is_lost():
    pieces = pieces_of(Doc("d"), [5, 80, 5], budget=50)
    assert [p.windows for p in pieces] == [[0], [1], [2]]


def test_a_document_without_windows_is_one_empty_piece():
    (piece,) = pieces_of(Doc("empty"), [], budget=50)
    assert (piece.windows, piece.tokens) == ([], 0)


def test_a_long_document_takes_at_most_half_a_micro_batch_per_piece():
    s = scheduler(max_tokens=100)
    assert s.piece_tokens == 50
    doc = Doc("long")
    assert all(p.tokens <= 50 for p in pieces_of(doc, [10] * 30, s.piece_tokens))
    assert len(pieces_of(doc, [10] * 30, s.piece_tokens)) == 6


# ------------------------------------------------------------------------------ when a batch goes


def test_with_the_model_free_a_batch_goes_when_its_wait_limit_passes():
    s = scheduler(max_wait_s=0.5)
    add(s, "a", [10], now=0.0)
    assert s.take(0.2, model_free=True, idle=True, stopping=False) is None
    assert s.wait_s(0.2, model_free=True) == 0.3
    assert names(s.take(0.5, model_free=True, idle=True, stopping=False)) == ["a"]
    assert len(s) == 0


def test_while_the_model_is_busy_a_batch_grows_past_its_wait_limit_until_full():
    s = scheduler(max_docs=3, max_wait_s=0.5)
    add(s, "a", [10], now=0.0)
    add(s, "b", [10], now=0.1)
    assert s.take(5.0, model_free=False, idle=True, stopping=False) is None
    assert s.wait_s(5.0, model_free=False) == MODEL_POLL_S
    add(s, "c", [10], now=5.0)
    assert names(s.take(5.0, model_free=False, idle=False, stopping=False)) == ["a", "b", "c"]


def test_a_document_that_does_not_fit_sends_the_open_batch_first():
    s = scheduler(max_tokens=100)
    add(s, "a", [40], now=0.0)
    _, full = add(s, "b", [30], now=0.0)
    assert full is None
    _, full = add(s, "c", [40], now=0.0)
    assert names(full) == ["a", "b"]
    assert len(s) == 1


def test_a_long_document_joins_batches_one_piece_at_a_time():
    s = scheduler(max_tokens=100, max_wait_s=0.5)
    long, _ = add(s, "long", [50] * 3, now=0.0)  # three pieces of one window each
    # Nothing else waits and the model is free: a piece goes alone, at once.
    assert s.wait_s(0.0, model_free=True) == 0.0
    assert names(s.take(0.0, model_free=True, idle=True, stopping=False)) == ["long"]
    # New work came: a short document's batch takes the next piece along when it goes.
    add(s, "short", [5], now=0.1)
    assert s.take(0.1, model_free=True, idle=False, stopping=False) is None
    batch = s.take(0.6, model_free=True, idle=False, stopping=False)
    assert names(batch) == ["short", "long"]
    assert batch[1].windows == [1]
    assert names(s.take(0.7, model_free=True, idle=True, stopping=False)) == ["long"]
    assert len(s) == 0


def test_pieces_of_documents_no_longer_live_are_never_handed_out():
    s = scheduler(max_docs=3)
    gone, _ = add(s, "gone", [10], now=0.0)
    add(s, "kept", [10], now=0.0)
    gone.live = False  # its partition was revoked while it waited
    add(s, "late", [10], now=0.0)
    assert names(s.take(0.0, model_free=True, idle=False, stopping=False)) == ["kept", "late"]
    # A batch of nothing but revoked work is no batch at all.
    other, _ = add(s, "other", [10], now=1.0)
    other.live = False
    assert s.take(9.0, model_free=True, idle=True, stopping=False) is None
    assert len(s) == 0


def test_stopping_sends_what_waits_without_waiting_for_the_limit():
    s = scheduler(max_wait_s=10.0)
    add(s, "a", [10], now=0.0)
    add(s, "long", [60, 60], now=0.0)
    batch = s.take(0.0, model_free=False, idle=True, stopping=True)
    assert names(batch) == ["a", "long"]
    assert names(s.take(0.0, model_free=False, idle=True, stopping=True)) == ["long"]
    assert len(s) == 0


def test_an_idle_scheduler_waits_the_idle_poll():
    assert scheduler().wait_s(0.0, model_free=True) == IDLE_POLL_S


def test_one_pass_may_wait_behind_the_one_running():
    assert not scheduler().must_wait(2)
    assert scheduler().must_wait(3)


# ----------------------------------------------------------------------------------- backpressure


def test_backpressure_pauses_while_documents_wait_and_resumes_at_half_the_queue():
    b = Backpressure(capacity=8)
    assert b.update(waiting=0, queued=8) is None and not b.paused
    assert b.update(waiting=3, queued=8) is True and b.paused
    assert b.update(waiting=1, queued=2) is None  # still documents waiting for room
    assert b.update(waiting=0, queued=5) is None  # room, but not yet drained to half
    assert b.paused
    assert b.update(waiting=0, queued=4) is False and not b.paused
    assert b.update(waiting=0, queued=0) is None


def test_a_micro_batch_never_holds_more_than_its_limits_when_a_long_piece_rides_along():
    """A long document's piece rides along with a batch only within the batch's limits: room
    is kept for it while the batch fills."""
    s = Scheduler(BatchLimits(max_docs=2, max_tokens=100, max_wait_s=0.5))
    s.add(pieces_of(Doc("long"), [50] * 4, s.piece_tokens), 0.0)
    for name in ("a", "b"):
        s.add(pieces_of(Doc(name), [50], s.piece_tokens), 0.0)
    batch = s.take(0.0, model_free=False, idle=False, stopping=False)
    assert batch is not None
    assert len(batch) <= 2, [p.job.name for p in batch]
    assert sum(p.tokens for p in batch) <= 100


def test_the_open_batch_never_grows_past_max_docs_whatever_the_caller_does():
    """`add` closes the open batch at its document limit even when the caller adds several
    documents before taking."""
    s = Scheduler(BatchLimits(max_docs=2, max_tokens=100, max_wait_s=0.5))
    fulls = [s.add(pieces_of(Doc(f"d{i}"), [5], s.piece_tokens), 0.0) for i in range(5)]
    batch = s.take(0.0, model_free=True, idle=False, stopping=False)
    sizes = [len(f) for f in fulls if f] + [len(batch or [])]
    assert max(sizes) <= 2, sizes
