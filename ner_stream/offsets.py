"""Which offsets are safe to commit, given records that finish out of order.

A record's offset may be committed only once its output (or dead letter) is acknowledged, and,
since a Kafka commit covers everything before it, only once every earlier consumed record is
acknowledged too. The committed value follows Kafka's convention: the next offset to read, i.e.
the last contiguously acknowledged offset + 1.

Offsets that were never consumed (compacted away, transaction markers) do not block progress:
only tracked offsets have to be acknowledged.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["OffsetTracker", "PartitionOffsets", "TopicPartition"]

# (topic, partition); kafka-python's TopicPartition namedtuple compares and hashes equal to it.
TopicPartition = tuple[str, int]


class PartitionOffsets:
    """Commit bookkeeping for one partition.

    ``track`` and ``committable`` are O(1), ``ack`` O(log n) in the records in flight. Memory holds
    only the records in flight: acknowledged offsets are dropped as soon as the committable
    position passes them.
    """

    def __init__(self, start: int) -> None:
        """Start at ``start``, the committed position (the first offset expected)."""
        if start < 0:
            raise ValueError(f"start offset must not be negative, got {start}")
        # Tracked offsets not yet passed by the committable position, in increasing order;
        # _pending[_head:] is live. Popping from the front only moves _head, and the dead prefix is
        # cut off once it is the larger half, so pops are amortised O(1) and the list stays sorted
        # for bisect.
        self._pending: list[int] = []
        self._head = 0
        self._acked: set[int] = set()  # acknowledged offsets among the live pending ones
        self._next = start  # first offset that may still be tracked
        self._position = start  # committable position: everything below is done
        self._committed = start

    def track(self, offset: int) -> None:
        """Record that the record at ``offset`` was consumed; offsets must increase."""
        if offset < self._next:
            raise ValueError(f"offset {offset} tracked out of order: expected >= {self._next}")
        self._pending.append(offset)
        self._next = offset + 1

    def ack(self, offset: int) -> None:
        """Record that the output for ``offset`` was acknowledged; any order is fine.

        Acknowledging an offset twice, or one the committable position already passed, does
        nothing. Acknowledging an offset that was never tracked raises ``ValueError``.
        """
        if offset < self._position or offset in self._acked:
            return
        index = bisect_left(self._pending, offset, self._head)
        if index == len(self._pending) or self._pending[index] != offset:
            raise ValueError(f"offset {offset} acknowledged but never tracked")
        self._acked.add(offset)
        self._advance()

    def _advance(self) -> None:
        """Move the committable position past the acknowledged prefix of the pending offsets."""
        pending, acked = self._pending, self._acked
        head = self._head
        while head < len(pending) and pending[head] in acked:
            acked.remove(pending[head])
            self._position = pending[head] + 1
            head += 1
        if head == len(pending):
            pending.clear()
            head = 0
        elif head > len(pending) // 2:
            del pending[:head]
            head = 0
        self._head = head

    @property
    def position(self) -> int:
        """The committable position: one past the last offset of the acknowledged prefix (the
        ``start`` before anything is acknowledged). Offsets never tracked (transaction markers,
        records compacted away) may lie between it and the first record not acknowledged: see
        ``next_pending``."""
        return self._position

    @property
    def next_pending(self) -> int | None:
        """The first tracked offset not yet acknowledged, ``None`` when there is none."""
        return self._pending[self._head] if self._head < len(self._pending) else None

    def committable(self) -> int | None:
        """The offset to commit, or ``None`` when it would not move past the last commit."""
        return self._position if self._position > self._committed else None

    @property
    def committed(self) -> int:
        """The last committed offset (the ``start`` before any commit)."""
        return self._committed

    def mark_committed(self, offset: int) -> None:
        """Record that ``offset`` was committed for this partition."""
        self._committed = max(self._committed, offset)

    @property
    def in_flight(self) -> int:
        """Records tracked but not yet acknowledged."""
        return len(self._pending) - self._head - len(self._acked)


class OffsetTracker:
    """:class:`PartitionOffsets` for every assigned partition, keyed by ``(topic, partition)``."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, PartitionOffsets] = {}

    def revoke(self, tp: TopicPartition) -> None:
        """Stop tracking ``tp``; later acknowledgements for it are ignored."""
        self._partitions.pop(tp, None)

    def track(self, tp: TopicPartition, offset: int) -> None:
        """Record a consumed record.

        A partition that was never assigned is assigned implicitly, starting at ``offset``: its
        first record is the first one that must be acknowledged.
        """
        partition = self._partitions.get(tp)
        if partition is None:
            partition = self._partitions[tp] = PartitionOffsets(offset)
        partition.track(offset)

    def ack(self, tp: TopicPartition, offset: int) -> None:
        """Record an acknowledged output; ignored when ``tp`` is no longer assigned."""
        partition = self._partitions.get(tp)
        if partition is not None:
            partition.ack(offset)

    def position(self, tp: TopicPartition) -> int | None:
        """The committable position of ``tp`` (see ``PartitionOffsets.position``); ``None`` when
        ``tp`` is not tracked."""
        partition = self._partitions.get(tp)
        return None if partition is None else partition.position

    def next_pending(self, tp: TopicPartition) -> int | None:
        """The first tracked offset of ``tp`` not yet acknowledged (see
        ``PartitionOffsets.next_pending``); ``None`` when there is none or ``tp`` is not tracked."""
        partition = self._partitions.get(tp)
        return None if partition is None else partition.next_pending

    def committed(self, tp: TopicPartition) -> int | None:
        """The last committed offset of ``tp`` (where it started, before any commit); ``None``
        when ``tp`` is not tracked."""
        partition = self._partitions.get(tp)
        return None if partition is None else partition.committed

    def partitions(self) -> list[TopicPartition]:
        """The partitions tracked."""
        return list(self._partitions)

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit, only for the partitions whose position moved since the last commit."""
        result: dict[TopicPartition, int] = {}
        for tp, partition in self._partitions.items():
            offset = partition.committable()
            if offset is not None:
                result[tp] = offset
        return result

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Record a successful commit; partitions revoked meanwhile are skipped."""
        for tp, offset in offsets.items():
            partition = self._partitions.get(tp)
            if partition is not None:
                partition.mark_committed(offset)

    def in_flight(self) -> int:
        """Records tracked but not yet acknowledged, over all assigned partitions."""
        return sum(partition.in_flight for partition in self._partitions.values())
