"""Micro-batching (when a batch closes) and padding (what the model is fed)."""

from __future__ import annotations

import random

import pytest
import torch

from ner_stream.batching import (
    DEFAULT_BUCKETS,
    BatchLimits,
    MicroBatcher,
    bucket_length,
    pad_batch,
    pad_pass,
    plan_passes,
)
from ner_stream.vocab import PAD_ID, EncodedSentence


def batcher(max_docs: int = 4, max_tokens: int = 100, max_wait_s: float = 0.5) -> MicroBatcher:
    return MicroBatcher(
        BatchLimits(max_docs=max_docs, max_tokens=max_tokens, max_wait_s=max_wait_s)
    )


# ------------------------------------------------------------------------------- MicroBatcher


def test_an_empty_batch_is_never_due_and_has_no_deadline():
    b = batcher()
    assert len(b) == 0
    assert not b.due(1e9)
    assert b.time_left(0.0) is None
    assert b.take() == []


def test_closes_at_max_docs():
    b = batcher(max_docs=3, max_tokens=1000, max_wait_s=10)
    for i in range(2):
        b.add(f"d{i}", 5, now=0.0)
        assert not b.due(0.0)
    b.add("d2", 5, now=0.0)
    assert b.due(0.0)
    assert b.take() == ["d0", "d1", "d2"]
    assert len(b) == 0 and not b.due(0.0)
    b.add("d3", 995, now=1.0)  # the token count started again from zero
    assert not b.due(1.0)


def test_closes_at_max_tokens():
    b = batcher(max_docs=100, max_tokens=20, max_wait_s=10)
    b.add("a", 12, now=0.0)
    assert not b.due(0.0)
    assert b.fits(8) and not b.fits(9)
    b.add("b", 8, now=0.0)
    assert b.due(0.0)


def test_fits_refuses_an_item_that_would_pass_the_token_budget():
    b = batcher(max_tokens=20)
    b.add("a", 15, now=0.0)
    assert b.fits(5)
    assert not b.fits(6)


def test_an_empty_batch_accepts_any_item_so_a_huge_document_still_runs():
    b = batcher(max_tokens=20)
    assert b.fits(10_000)
    b.add("huge", 10_000, now=0.0)
    assert b.due(0.0)
    assert not b.fits(1)  # but nothing joins it
    assert b.take() == ["huge"]
    assert b.fits(10_000)  # empty again


def test_max_wait_counts_from_the_first_item():
    b = batcher(max_docs=100, max_tokens=1000, max_wait_s=0.5)
    b.add("first", 1, now=10.0)
    b.add("second", 1, now=10.4)  # a later item does not restart the clock
    assert not b.due(10.49)
    assert b.due(10.5)
    assert b.time_left(10.1) == pytest.approx(0.4)
    assert b.time_left(10.4) == pytest.approx(0.1)
    assert b.time_left(11.0) == 0.0  # never negative


def test_the_wait_clock_restarts_with_the_next_batch():
    b = batcher(max_docs=100, max_tokens=1000, max_wait_s=0.5)
    b.add("a", 1, now=0.0)
    assert b.due(0.6)
    b.take()
    b.add("b", 1, now=5.0)
    assert not b.due(5.4)
    assert b.time_left(5.1) == pytest.approx(0.4)
    assert b.due(5.5)


def test_zero_wait_closes_at_once():
    b = batcher(max_wait_s=0.0)
    b.add("a", 1, now=3.0)
    assert b.due(3.0)
    assert b.time_left(3.0) == 0.0


# ------------------------------------------------------------------------------ bucket_length


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, 8), (1, 8), (8, 8), (9, 16), (16, 16), (17, 32), (32, 32), (33, 33), (500, 500)],
)
def test_bucket_length_is_the_smallest_bucket_holding_n(n, expected):
    assert bucket_length(n, (8, 16, 32)) == expected


def test_bucket_length_without_buckets_is_n():
    assert bucket_length(7, ()) == 7


# ---------------------------------------------------------------------------------- pad_batch


def sent(n: int, word0: int = 2, tags: bool = False) -> EncodedSentence:
    return EncodedSentence(
        words=[word0 + i for i in range(n)],
        chars=[[3] * (i + 1) for i in range(n)],  # word i has i + 1 characters
        cases=[4] * n,
        tags=[1] * n if tags else None,
    )


def test_pad_batch_shapes_mask_and_padding_ids():
    batch = pad_batch([sent(3), sent(5, word0=10)])
    assert batch.words.shape == (2, 5)
    assert batch.cases.shape == (2, 5)
    assert batch.mask.shape == (2, 5)
    assert batch.chars.shape == (2, 5, 5)  # longest word: 5 characters
    assert batch.words.dtype == torch.int64 and batch.mask.dtype == torch.bool
    assert batch.words[0].tolist() == [2, 3, 4, PAD_ID, PAD_ID]
    assert batch.words[1].tolist() == [10, 11, 12, 13, 14]
    assert batch.cases[0].tolist() == [4, 4, 4, PAD_ID, PAD_ID]
    assert batch.mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    # Characters are left-aligned in their slot and padded with <PAD>.
    assert batch.chars[0, 0].tolist() == [3, PAD_ID, PAD_ID, PAD_ID, PAD_ID]
    assert batch.chars[0, 2].tolist() == [3, 3, 3, PAD_ID, PAD_ID]
    assert (batch.chars[0, 3:] == PAD_ID).all()
    assert batch.num_tokens == 8
    assert batch.tags is None


def test_pad_batch_pads_to_a_bucket_length():
    batch = pad_batch([sent(3), sent(2)], pad_to=8)
    assert batch.words.shape == (2, 8)
    assert batch.mask.sum(1).tolist() == [3, 2]
    assert (batch.words[:, 3:] == PAD_ID).all()


def test_pad_to_shorter_than_the_longest_sentence_keeps_every_token():
    batch = pad_batch([sent(6)], pad_to=4)
    assert batch.words.shape == (1, 6)
    assert batch.mask.all()


def test_pad_batch_includes_tags_only_when_every_sentence_has_them():
    with_tags = pad_batch([sent(2, tags=True), sent(3, tags=True)])
    assert with_tags.tags is not None
    assert with_tags.tags.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert pad_batch([sent(2, tags=True), sent(3)]).tags is None


def test_an_empty_sentence_keeps_one_position_for_the_model():
    batch = pad_batch([sent(0), sent(2)])
    assert batch.words.shape == (2, 2)
    assert batch.mask[0].tolist() == [True, False]  # the model needs a first step
    assert batch.words[0].tolist() == [PAD_ID, PAD_ID]


def test_an_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([])


def groups(lengths, budget=8192):
    return [(p.sequences, p.length) for p in plan_passes(lengths, DEFAULT_BUCKETS, budget)]


def test_a_bucket_with_few_sentences_joins_the_next_instead_of_a_pass_of_its_own():
    # Fewer rows than a pass is padded to anyway: one forward pass for all of them.
    assert groups([3, 10, 20, 30, 50]) == [([0, 1, 2, 3, 4], 64)]
    # Full buckets still get a pass each, at their own length.
    lengths = [5] * 20 + [60] * 20
    assert groups(lengths) == [(list(range(20)), 8), (list(range(20, 40)), 64)]
    # Seven short sentences join the long ones rather than being padded to 8 rows alone.
    lengths = [5] * 7 + [60] * 20
    assert groups(lengths) == [(list(range(27)), 64)]
    # The pass budget still cuts a group: 4 x 64 fits in 256 positions, a fifth row does not.
    assert groups([3, 10, 20, 30, 50], budget=256) == [([0, 1, 2, 3], 32), ([4], 64)]


def test_passes_cover_every_sequence_once_sorted_and_within_the_budget():
    rng = random.Random(7)
    for budget in (64, 256, 8192):
        lengths = [rng.randint(0, 60) for _ in range(300)]
        passes = plan_passes(lengths, DEFAULT_BUCKETS, budget)
        seen = [i for p in passes for i in p.sequences]
        assert sorted(seen) == [i for i, n in enumerate(lengths) if n]
        assert [lengths[i] for i in seen] == sorted(lengths[i] for i in seen)
        for p in passes:
            assert p.rows >= len(p.sequences) and p.positions <= budget
            assert all(lengths[i] <= p.length for i in p.sequences)


def test_a_lone_sequence_longer_than_the_budget_runs_alone_at_its_own_length():
    (only,) = plan_passes([300], DEFAULT_BUCKETS, 256)
    assert (only.sequences, only.length, only.rows) == ([0], 300, 1)


def test_pad_pass_adds_the_empty_rows_of_the_plan():
    sentence = EncodedSentence(words=[5, 6, 7], chars=[[1], [2], [3]], cases=[1, 1, 1])
    (plan,) = plan_passes([3, 3], DEFAULT_BUCKETS, 8192)
    batch = pad_pass([sentence, sentence], plan)
    assert tuple(batch.words.shape) == (plan.rows, plan.length) == (8, 8)
    assert batch.mask[:2, :3].all() and not batch.mask[2:, 1:].any()
