"""Commit tracking: out-of-order acks, gaps, revocation, and a randomised model check."""

from __future__ import annotations

import random

import pytest

from ner_stream.offsets import OffsetTracker, PartitionOffsets

TP = ("news", 0)
TP2 = ("news", 1)


def test_nothing_to_commit_at_start() -> None:
    partition = PartitionOffsets(10)
    assert partition.committable() is None
    assert partition.in_flight == 0


def test_in_order_acks() -> None:
    partition = PartitionOffsets(0)
    for offset in range(3):
        partition.track(offset)
    assert partition.in_flight == 3
    partition.ack(0)
    assert partition.committable() == 1
    partition.ack(1)
    partition.ack(2)
    assert partition.committable() == 3
    assert partition.in_flight == 0


def test_out_of_order_acks_wait_for_the_oldest() -> None:
    partition = PartitionOffsets(100)
    for offset in range(100, 105):
        partition.track(offset)
    partition.ack(103)
    partition.ack(101)
    assert partition.committable() is None  # 100 still in flight
    assert partition.in_flight == 3
    partition.ack(100)
    assert partition.committable() == 102  # 102 still in flight
    partition.ack(104)
    assert partition.committable() == 102
    partition.ack(102)
    assert partition.committable() == 105
    assert partition.in_flight == 0


def test_gaps_do_not_block_progress() -> None:
    # Compacted topics and transaction markers leave offsets that are never consumed.
    partition = PartitionOffsets(0)
    for offset in (3, 7, 8, 20):
        partition.track(offset)
    partition.ack(7)
    assert partition.committable() is None  # 3 is in flight
    partition.ack(3)
    assert partition.committable() == 8  # past the gap 4-6, up to 8 which is in flight
    partition.ack(8)
    assert partition.committable() == 9  # 20 is in flight; 9-19 were never consumed
    partition.ack(20)
    assert partition.committable() == 21


def test_mark_committed_suppresses_repeats() -> None:
    partition = PartitionOffsets(0)
    partition.track(0)
    partition.track(1)
    partition.ack(0)
    assert partition.committable() == 1
    partition.mark_committed(1)
    assert partition.committable() is None
    partition.ack(1)
    assert partition.committable() == 2
    partition.mark_committed(1)  # a late report of an older commit does not go backwards
    assert partition.committable() == 2


def test_duplicate_and_stale_acks_are_ignored() -> None:
    partition = PartitionOffsets(0)
    partition.track(0)
    partition.track(1)
    partition.ack(1)
    partition.ack(1)
    assert partition.in_flight == 1
    partition.ack(0)
    partition.ack(0)
    assert partition.committable() == 2
    assert partition.in_flight == 0


def test_misuse_raises() -> None:
    partition = PartitionOffsets(5)
    with pytest.raises(ValueError):
        partition.track(4)  # before the start
    partition.track(5)
    partition.track(9)
    with pytest.raises(ValueError):
        partition.track(9)  # not increasing
    with pytest.raises(ValueError):
        partition.ack(7)  # a gap, never tracked
    with pytest.raises(ValueError):
        partition.ack(10)  # not tracked yet
    with pytest.raises(ValueError):
        PartitionOffsets(-1)


def test_acked_offsets_are_not_retained() -> None:
    # White-box: memory must not grow with acknowledged offsets, only with those in flight.
    partition = PartitionOffsets(0)
    for offset in range(100_000):
        partition.track(offset)
        if offset >= 10:
            partition.ack(offset - 10)
    assert partition.in_flight == 10
    assert len(partition._pending) - partition._head == 10
    assert len(partition._pending) <= 30
    assert not partition._acked


# --- many partitions -----------------------------------------------------------------------------


def test_tracker_reports_only_partitions_that_advanced() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 0)
    tracker.track(TP2, 50)
    tracker.track(TP2, 51)
    assert tracker.in_flight() == 3
    tracker.ack(TP2, 51)
    assert tracker.committable() == {}
    tracker.ack(TP2, 50)
    assert tracker.committable() == {TP2: 52}
    tracker.mark_committed({TP2: 52})
    assert tracker.committable() == {}
    tracker.ack(TP, 0)
    assert tracker.committable() == {TP: 1}
    assert tracker.in_flight() == 0


def test_revoked_partition_is_forgotten_and_its_acks_ignored() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 0)
    tracker.track(TP, 1)
    tracker.revoke(TP)
    tracker.ack(TP, 0)  # a late acknowledgement
    tracker.ack(TP, 1)
    assert tracker.committable() == {}
    assert tracker.in_flight() == 0
    tracker.mark_committed({TP: 2})  # commit results for revoked partitions are skipped
    tracker.revoke(TP)  # revoking twice is harmless


def test_reassignment_starts_fresh() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 0)
    tracker.revoke(TP)
    assert tracker.in_flight() == 0
    tracker.track(TP, 0)
    tracker.ack(TP, 0)
    assert tracker.committable() == {TP: 1}


def test_tracking_an_unassigned_partition_assigns_it() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 42)
    assert tracker.committable() == {}
    tracker.ack(TP, 42)
    assert tracker.committable() == {TP: 43}


def test_kafka_style_topic_partition_keys() -> None:
    # kafka-python's TopicPartition is a namedtuple, equal to the plain tuple.
    from collections import namedtuple

    TopicPartition = namedtuple("TopicPartition", ["topic", "partition"])
    tracker = OffsetTracker()
    tracker.track(TopicPartition("news", 0), 0)
    tracker.ack(TP, 0)
    assert tracker.committable() == {TP: 1}


# --- randomised model check ----------------------------------------------------------------------


class _Reference:
    """Obviously correct and slow: recompute everything from the sets of offsets."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.tracked: list[int] = []
        self.acked: set[int] = set()
        self.committed = start

    def position(self) -> int:
        position = self.start
        for offset in self.tracked:
            if offset not in self.acked:
                break
            position = offset + 1
        return position

    def committable(self) -> int | None:
        position = self.position()
        return position if position > self.committed else None


@pytest.mark.parametrize("seed", range(10))
def test_matches_reference_model(seed: int) -> None:
    rng = random.Random(seed)
    start = rng.randrange(0, 1000)
    partition = PartitionOffsets(start)
    reference = _Reference(start)
    next_offset = start
    for _ in range(2000):
        unacked = [offset for offset in reference.tracked if offset not in reference.acked]
        action = rng.random()
        if action < 0.45:
            next_offset += 1 + (rng.randrange(5) if rng.random() < 0.2 else 0)  # some gaps
            partition.track(next_offset - 1)
            reference.tracked.append(next_offset - 1)
        elif action < 0.85 and unacked:
            # Mostly the oldest records finish first, but in any order.
            offset = rng.choice(unacked[:8]) if rng.random() < 0.8 else rng.choice(unacked)
            partition.ack(offset)
            reference.acked.add(offset)
        elif action < 0.9 and reference.acked:
            offset = rng.choice(sorted(reference.acked))
            partition.ack(offset)  # duplicate
        elif action < 1.0:
            committable = partition.committable()
            assert committable == reference.committable()
            if committable is not None and rng.random() < 0.7:
                partition.mark_committed(committable)
                reference.committed = committable
        assert partition.committable() == reference.committable()
        assert partition.in_flight == len(reference.tracked) - len(reference.acked)
        # The invariant itself: never past a tracked offset that is not acknowledged.
        position = partition.committable() or reference.committed
        assert all(offset >= position for offset in unacked if offset not in reference.acked)


@pytest.mark.parametrize("seed", range(5))
def test_tracker_matches_reference_across_partitions(seed: int) -> None:
    rng = random.Random(1000 + seed)
    partitions = [("a", 0), ("a", 1), ("b", 0)]
    tracker = OffsetTracker()
    references: dict[tuple[str, int], _Reference] = {}
    for tp in partitions:
        references[tp] = _Reference(0)
    for _ in range(3000):
        tp = rng.choice(partitions)
        reference = references.get(tp)
        action = rng.random()
        if action < 0.02:
            tracker.revoke(tp)
            references.pop(tp, None)
        elif action < 0.04 and reference is None:
            # Assigned again: the tracker starts afresh at the first offset it is given.
            start = rng.randrange(0, 50)
            references[tp] = _Reference(start)
        elif reference is None:
            tracker.ack(tp, rng.randrange(0, 100))  # ignored: not assigned
        elif action < 0.5:
            offset = (reference.tracked[-1] + 1 if reference.tracked else reference.start) + (
                rng.randrange(3)
            )
            tracker.track(tp, offset)
            reference.tracked.append(offset)
        elif action < 0.9:
            unacked = [offset for offset in reference.tracked if offset not in reference.acked]
            if unacked:
                offset = rng.choice(unacked)
                tracker.ack(tp, offset)
                reference.acked.add(offset)
        else:
            expected = {
                key: value
                for key, ref in references.items()
                if (value := ref.committable()) is not None
            }
            assert tracker.committable() == expected
            tracker.mark_committed(expected)
            for key, value in expected.items():
                references[key].committed = value
        assert tracker.in_flight() == sum(
            len(ref.tracked) - len(ref.acked) for ref in references.values()
        )
