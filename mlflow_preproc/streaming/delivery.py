"""Sorting the producer's delivery errors: what is worth retrying and what is not.

A delivery can fail for four kinds of reasons, and each asks for a different answer:

- **permanent**: the record itself can never be written (too large, invalid). Retrying cannot
  help; its input goes to the dead-letter topic with the broker's error code.
- **topic refused**: the topic refuses this client, whatever the record (no write ACL, the
  topic gone or never created, an invalid name). Every record would fail alike: dead-lettering
  them would drain the input into the DLQ and commit it (#32: a missing ACL on the output
  topic made 50 of 50 records dead letters). The loop stops (exit 2) naming the fix, with
  the record uncommitted, as it does when the dead-letter topic itself refuses it.
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

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from confluent_kafka import KafkaError, Message


class Failure(Enum):
    PERMANENT = "permanent"
    TOPIC_REFUSED = "topic refused"
    BROKEN_PRODUCER = "broken producer"
    RETRIABLE = "retriable"


_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD,
    KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_MSG_SIZE,
    KafkaError.POLICY_VIOLATION, KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
    KafkaError._INVALID_ARG, KafkaError._BAD_MSG,
}
_TOPIC_REFUSED = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TOPIC_EXCEPTION, KafkaError._UNKNOWN_TOPIC,
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
    if code in _TOPIC_REFUSED:
        return Failure.TOPIC_REFUSED
    if code in _BROKEN_PRODUCER or err.fatal():
        return Failure.BROKEN_PRODUCER
    return Failure.RETRIABLE


def topic_refused_fix(err: KafkaError) -> str:
    """What to change when a topic refuses this client with ``err``."""
    if err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED,
                      KafkaError.CLUSTER_AUTHORIZATION_FAILED):
        return "grant this client write access to it (ACLs)"
    if err.code() in (KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART):
        return "create it, or set AUTO_CREATE_TOPICS=true"
    return "fix the broker or topic settings named in the error"


def is_size_error(err: KafkaError) -> bool:
    """The record is over a size limit (the client's ``message.max.bytes`` or the broker's)."""
    return err.code() in (KafkaError.MSG_SIZE_TOO_LARGE,
                          KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE)


class Delivery:
    """``on_delivery`` of what one input message produced; called only when a delivery fails
    (``delivery.report.only.error``). Keeps the headers, which delivery reports lack, and
    hands the failure to ``failed`` (the loop's) with itself."""

    __slots__ = ("failed", "source", "headers", "dead_letter")

    def __init__(self, failed: Callable[[Delivery, KafkaError, Message], None],
                 source: Message, headers: list[tuple[str, bytes]],
                 dead_letter: bool = False):
        self.failed = failed
        self.source = source
        self.headers = headers
        self.dead_letter = dead_letter

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failed(self, err, msg)


@dataclass(frozen=True)
class Redelivery:
    """An output (or dead-letter copy) to send again: delivery reports carry no headers, so
    they are kept here."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    on_delivery: object
