"""The loop's output: the producer in use, its replacement and the latch of its errors.

The producer is replaced when it cannot go on: an idempotent one that lost its sequence state
(``broken``: what it held is sent again by a new one), a transactional one that failed or was
fenced (``must_abort``: the open transaction is aborted at the next commit, and
:meth:`~mlflow_preproc.streaming.transactions.TransactionalProducer.replace` makes a new one).
Its errors arrive in librdkafka's callbacks, in the middle of a poll: they are latched here
and acted on by the loop between batches. Quix Streams' ``InternalProducer`` is the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import KafkaError, Producer

from mlflow_preproc.streaming.errors import Abandon
from mlflow_preproc.streaming.headers import Headers
from mlflow_preproc.streaming.shutdown import Shutdown
from mlflow_preproc.streaming.transactions import TransactionalProducer

logger = logging.getLogger("mlflow_preproc")


class Output:
    """Owns the loop's producer. ``make`` makes a new one (with the loop's settings and
    error callback); ``given`` is the first, if the caller has one (a test double)."""

    def __init__(self, make: Callable[[], Producer], given: Producer | None,
                 exactly_once: bool, shutdown: Shutdown):
        self.make = make
        self.shutdown = shutdown
        # The idempotent producer lost its sequence state: a new one sends what it held.
        self.broken = False
        # Exactly once: why the open transaction must be aborted (a delivery or the producer
        # failed), or None.
        self.must_abort: str | None = None
        self.transaction: TransactionalProducer | None = None
        if exactly_once:
            first = [given] if given is not None else []
            self.transaction = TransactionalProducer(lambda: first.pop() if first else make())
            self.producer = self.transaction
        else:
            self.producer = given if given is not None else make()

    def send(self, topic: str, value: bytes | None, key: bytes | None, headers: Headers,
             callback: Callable) -> None:
        """Produce one message, waiting while the producer's local queue is full; raises
        :class:`~mlflow_preproc.streaming.errors.Abandon` if asked to stop meanwhile."""
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers, on_delivery=callback)
                return
            except BufferError:
                # The local queue is full: let the broker catch up, unless we are asked to
                # stop (the broker may be away for longer than the shutdown grace period).
                if self.shutdown.requested:
                    raise Abandon("shutting down with the producer's queue full") from None
                self.producer.poll(0.1)

    def replace(self) -> None:
        """A new idempotent producer for the broken one."""
        # An idempotent producer that lost its sequence state refuses everything from now on
        # (on Tansu: PRODUCER_FENCED after any timeout). What it still holds fails over to
        # the loop's redeliveries through the purge's delivery reports.
        logger.warning("the producer cannot deliver any more (idempotence state lost); "
                       "replacing it", extra={"event": "producer_replaced"})
        old = self.producer
        old.purge()
        old.flush(5)
        self.producer = self.make()
        self.broken = False

    def on_error(self, err: KafkaError) -> bool:
        """The producer's ``error_cb``: latches a fatal error; False for any other, which is
        the client's in general (the loop's to log)."""
        if err.fatal() and self.transaction is not None:
            # Fenced (its transaction timed out) or failed: the next transactional call
            # fails too; the transaction is aborted there and a new producer made.
            self.must_abort = self.must_abort or f"producer failed: {err.str()}"
            logger.warning("transactional producer failed", extra={
                "event": "producer_failed", "error": err.str()})
        elif err.fatal():
            # The idempotent producer lost its sequence state: a new one sends what it held.
            self.broken = True
            logger.warning("producer failed", extra={"event": "producer_failed",
                                                     "error": err.str()})
        else:
            return False
        return True
