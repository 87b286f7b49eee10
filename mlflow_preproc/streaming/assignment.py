"""The partitions this member owns, and the pause of its input.

Input is paused while a dependency is down (``KafkaLoop.wait``), while deliveries are
retried and while the dead-letter brake holds. librdkafka keeps a partition's pause across a
revoke or loss, so a partition assigned again would stay paused for good: each assignment
is settled (paused or resumed, whichever the loop is in) right after it takes effect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from confluent_kafka import Consumer, Producer, TopicPartition

from mlflow_preproc.streaming.shutdown import Shutdown


class Assignment:
    """Owned, unsettled and paused partitions of ``consumer``. ``producer`` returns the
    producer in use now (it can be replaced), polled for delivery reports while paused."""

    def __init__(self, consumer: Consumer, producer: Callable[[], Producer],
                 shutdown: Shutdown):
        self.consumer = consumer
        self.producer = producer
        self.shutdown = shutdown
        self.owned: set[tuple[str, int]] = set()
        self.paused = False
        self.unsettled: set[tuple[str, int]] = set()

    def assigned(self, keys: list[tuple[str, int]]) -> None:
        """Partitions assigned (``on_assign``); settled on the next poll, when it has taken
        effect."""
        self.owned.update(keys)
        self.unsettled.update(keys)

    def given_up(self, keys: list[tuple[str, int]]) -> None:
        """Partitions revoked or lost."""
        self.owned.difference_update(keys)

    @contextmanager
    def input_paused(self) -> Iterator[None]:
        """Pause every partition assigned now or while inside; resume all of them after."""
        if self.paused:  # already paused by the caller
            yield
            return
        self.paused = True
        self.consumer.pause(self.consumer.assignment())
        try:
            yield
        finally:
            self.paused = False
            self.unsettled.clear()
            self.consumer.resume(self.consumer.assignment())

    def settle(self) -> None:
        """Pause or resume the partitions assigned since the last call, as the loop is."""
        partitions = [TopicPartition(topic, partition)
                      for topic, partition in self.unsettled if (topic, partition) in self.owned]
        self.unsettled.clear()
        if partitions:
            (self.consumer.pause if self.paused else self.consumer.resume)(partitions)

    def poll_paused(self, seconds: float) -> None:
        """Poll the consumer (and the producer) for ``seconds`` with input paused, so the
        group keeps this member; what was fetched before the pause is read again after."""
        rewind: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + seconds
        while not self.shutdown.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self.unsettled:
                self.settle()
            for msg in self.consumer.consume(100, min(left, 0.2)):
                # Fetched before the pause took effect: read it again after the resume.
                if msg.error() is None:
                    key = (msg.topic(), msg.partition())
                    rewind[key] = min(rewind.get(key, msg.offset()), msg.offset())
            self.producer().poll(0)
        for (topic, partition), offset in rewind.items():
            if (topic, partition) in self.owned:
                self.consumer.seek(TopicPartition(topic, partition, offset))
