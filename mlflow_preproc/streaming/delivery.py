"""Sorting the producer's delivery errors: what is worth retrying and what is not.

A delivery can fail for three kinds of reasons, and each asks for a different answer:

- **permanent**: the record itself can never be written (too large, invalid, not authorised).
  Retrying cannot help; its input goes to the dead-letter topic with the broker's error code.
- **broken producer**: the idempotent producer lost its sequence state (fenced, unknown
  producer id, out-of-order sequence, fatal). The record is fine but this producer instance
  will refuse everything from now on: a new producer sends it again.
- **retriable**: everything else, above all a delivery that timed out after
  ``message.timeout.ms`` because the broker was away. Sending it to the dead-letter topic would
  turn a broker outage into data for a replay; it is sent again and, meanwhile, nothing is
  committed.

Unknown codes are treated as retriable: a stream that waits is visible (logs, /healthz) and
loses nothing, a stream that dead-letters good records on a transient error silently does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from confluent_kafka import KafkaError


class Failure(Enum):
    PERMANENT = "permanent"
    BROKEN_PRODUCER = "broken producer"
    RETRIABLE = "retriable"


_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD,
    KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_MSG_SIZE,
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.TOPIC_EXCEPTION,
    KafkaError.POLICY_VIOLATION, KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
    KafkaError._INVALID_ARG, KafkaError._BAD_MSG,
}
_BROKEN_PRODUCER = {
    KafkaError.PRODUCER_FENCED, KafkaError._FENCED, KafkaError._FATAL,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.INVALID_PRODUCER_EPOCH, KafkaError.INVALID_PRODUCER_ID_MAPPING,
}


def classify(err: KafkaError) -> Failure:
    """Which kind of delivery failure ``err`` is."""
    code = err.code()
    if code in _PERMANENT:
        return Failure.PERMANENT
    if code in _BROKEN_PRODUCER or err.fatal():
        return Failure.BROKEN_PRODUCER
    return Failure.RETRIABLE


def is_size_error(err: KafkaError) -> bool:
    """The record is over a size limit (the client's ``message.max.bytes`` or the broker's)."""
    return err.code() in (KafkaError.MSG_SIZE_TOO_LARGE,
                          KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE)


@dataclass(frozen=True)
class Redelivery:
    """An output (or dead-letter copy) to send again: delivery reports carry no headers, so
    they are kept here."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    on_delivery: object
