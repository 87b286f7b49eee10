"""What a consumer may commit: per partition, the offset after the last fully handled input.

A Kafka commit says "everything before this offset is done". Done means: every output made
from those inputs, or their dead-letter copies, was handed to the producer, and the producer
then flushed them with no delivery error outstanding. :class:`Checkpoint` keeps the first half
(what was handed); :class:`~mlflow_preproc.streaming.loop.KafkaLoop` checks the second half
before it asks for :meth:`Checkpoint.to_commit`.

A batch that is abandoned or fails half way is never marked, so whatever happens next (an
exception, a signal, a rebalance, a broker outage) its inputs stay uncommitted and the group
processes them again: at least once, never "committed but lost". This is the rule Kafka
Streams and Quix Streams follow: commit what was processed, not what was consumed.

Exactly once (:mod:`~mlflow_preproc.streaming.transactions`) adds the way back: a transaction
that is aborted takes every output since the last commit with it, so the loop reads each
partition again from :meth:`Checkpoint.rewind`, the last committed offset or, before the first
commit, the first offset consumed since the partition was assigned (:meth:`consumed`).
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import Message, TopicPartition

Partition = tuple[str, int]


class Checkpoint:
    """Per partition: the next offset whose inputs have all been handled (pure bookkeeping)."""

    def __init__(self) -> None:
        self._handled: dict[Partition, int] = {}
        self._committed: dict[Partition, int] = {}
        self._first: dict[Partition, int] = {}  # exactly once: consumed first since assigned

    def consumed(self, messages: Iterable[Message]) -> None:
        """Exactly once: note the first offset consumed of each partition since it was
        assigned, where :meth:`rewind` goes back to before anything is committed."""
        first = self._first
        for msg in messages:
            key = (msg.topic(), msg.partition())
            if key not in first:
                first[key] = msg.offset()

    def mark_handled(self, messages: Iterable[Message], owned: set[Partition]) -> None:
        """Record that ``messages`` are handled; partitions not ``owned`` any more are skipped
        (revoked while the batch was handled: their new owner processes them again)."""
        handled = self._handled
        for msg in messages:
            key = (msg.topic(), msg.partition())
            if key in owned:
                following = msg.offset() + 1
                if following > handled.get(key, -1):
                    handled[key] = following

    def to_commit(self, partitions: Iterable[Partition] | None = None) -> list[TopicPartition]:
        """Offsets handled since the last commit (of ``partitions``, default all)."""
        keys = self._handled if partitions is None else \
            [p for p in partitions if p in self._handled]
        return [TopicPartition(topic, partition, self._handled[(topic, partition)])
                for topic, partition in keys
                if self._committed.get((topic, partition)) != self._handled[(topic, partition)]]

    def committed(self, offsets: Iterable[TopicPartition]) -> None:
        """The broker accepted these offsets."""
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset

    def commit_failed(self, offsets: Iterable[TopicPartition]) -> None:
        """A commit of these offsets failed: the next :meth:`to_commit` offers them again."""
        for tp in offsets:
            self._committed.pop((tp.topic, tp.partition), None)

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Partitions revoked or lost: another member owns them now."""
        for key in partitions:
            self._handled.pop(key, None)
            self._committed.pop(key, None)
            self._first.pop(key, None)

    def rewind(self, owned: Iterable[Partition]) -> list[TopicPartition]:
        """The transaction since the last commit was aborted: everything handled since is
        undone, and each ``owned`` partition read so far is read again from its last
        committed offset (or its first consumed one). Returns where to seek."""
        seeks = []
        for key in owned:
            offset = self._committed.get(key, self._first.get(key))
            if offset is None:
                continue  # nothing consumed from it yet
            seeks.append(TopicPartition(key[0], key[1], offset))
            if key in self._committed:
                self._handled[key] = offset
            else:
                self._handled.pop(key, None)
        return seeks

    def handled(self) -> dict[Partition, int]:
        """A copy of the handled offsets, for logs and tests."""
        return dict(self._handled)
