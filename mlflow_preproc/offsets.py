"""Which input offsets are safe to commit.

At-least-once means an input offset is committed only once every output derived from it (its
preprocessed records, or its dead-letter copy) has been acknowledged by the broker. Outputs are
acknowledged out of order and several batches can be in flight, so per partition this keeps the
consumed offsets in order with a count of unacknowledged outputs; the commit point advances over
the leading offsets whose count reached zero.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TopicPartitionKey = tuple[str, int]


@dataclass
class _Pending:
    offset: int
    outstanding: int


@dataclass
class _PartitionLog:
    pending: deque[_Pending] = field(default_factory=deque)
    by_offset: dict[int, _Pending] = field(default_factory=dict)
    committable: int | None = None  # next offset to commit (last done + 1)
    committed: int | None = None


class OffsetTracker:
    """Tracks consumed offsets until all their outputs are acknowledged."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartitionKey, _PartitionLog] = {}

    def consumed(self, tp: TopicPartitionKey, offset: int) -> None:
        """Record an offset as consumed; outputs are then added with :meth:`add_output`."""
        log = self._partitions.setdefault(tp, _PartitionLog())
        entry = _Pending(offset, 0)
        log.pending.append(entry)
        log.by_offset[offset] = entry

    def add_output(self, tp: TopicPartitionKey, offset: int) -> None:
        """One more output of this input is in flight."""
        self._partitions[tp].by_offset[offset].outstanding += 1

    def acknowledged(self, tp: TopicPartitionKey, offset: int) -> None:
        """One output of this input was acknowledged by the broker."""
        log = self._partitions.get(tp)
        if log is None or offset not in log.by_offset:
            return  # the partition was revoked meanwhile: its new owner reprocesses
        log.by_offset[offset].outstanding -= 1

    def commit_points(self) -> dict[TopicPartitionKey, int]:
        """Offsets that can be committed now and were not committed yet (next offset to read)."""
        points = {}
        for tp, log in self._partitions.items():
            while log.pending and log.pending[0].outstanding <= 0:
                done = log.pending.popleft()
                del log.by_offset[done.offset]
                log.committable = done.offset + 1
            if log.committable is not None and log.committable != log.committed:
                points[tp] = log.committable
        return points

    def mark_committed(self, points: dict[TopicPartitionKey, int]) -> None:
        for tp, offset in points.items():
            if tp in self._partitions:
                self._partitions[tp].committed = offset

    def in_flight(self) -> int:
        """Inputs consumed whose outputs are not all acknowledged yet."""
        return sum(len(log.pending) for log in self._partitions.values())

    def forget(self, tps: list[TopicPartitionKey]) -> None:
        """Drop revoked partitions."""
        for tp in tps:
            self._partitions.pop(tp, None)
