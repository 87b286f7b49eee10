"""The ``x-preproc-*`` header contract, for the writers (the loop, the stream, the model's
identity, dead-letter replay) and the readers (``dlq inspect``/``replay``) alike.

Every output carries its input's own headers, then ``x-preproc-source`` and the model's
provenance (``x-preproc-model``, with a prediction model ``x-preproc-prediction-model``).
A dead letter carries the input's own headers, then ``x-preproc-error``, ``-error-type``,
``-stage`` (with ``-failed-records`` for a message of several records, ``-original-size``
and ``-original-sha256`` when it was truncated), then the provenance. A replayed record
carries ``x-preproc-replay-of``. Names only; nothing here imports a Kafka client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from confluent_kafka import Message

PREFIX = "x-preproc-"

Headers = list[tuple[str, bytes]]

# Provenance: on every output and dead letter.
SOURCE = PREFIX + "source"  # topic/partition/offset of the input
MODEL = PREFIX + "model"
PREDICTION_MODEL = PREFIX + "prediction-model"

# Why a record is a dead letter.
ERROR = PREFIX + "error"  # the first of the stream's headers on a dead letter
ERROR_TYPE = PREFIX + "error-type"
STAGE = PREFIX + "stage"
FAILED_RECORDS = PREFIX + "failed-records"
ORIGINAL_SIZE = PREFIX + "original-size"
ORIGINAL_SHA256 = PREFIX + "original-sha256"

# A dead letter sent back: <dlq topic>/<partition>/<offset>.
REPLAY_OF = PREFIX + "replay-of"

MAX_ERROR_LENGTH = 4000  # characters of x-preproc-error


def source_header(msg: Message) -> tuple[str, bytes]:
    """The provenance header naming the input an output came from: ``topic/partition/offset``
    (Kafka topic names cannot contain ``/``)."""
    return SOURCE, f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()


def parse_source(text: str | None) -> tuple[str, int, int] | None:
    """The topic, partition and offset an ``x-preproc-source`` value names; None if it
    names none."""
    topic, _, rest = (text or "").rpartition("/")
    topic, _, partition = topic.rpartition("/")
    if not (topic and partition.isdigit() and rest.isdigit()):
        return None
    return topic, int(partition), int(rest)


def error_type_of(error: BaseException | str) -> str:
    """The ``x-preproc-error-type`` of ``error``: the name of the exception behind it."""
    if isinstance(error, BaseException):
        cause = error.__cause__ or error
        return type(cause).__name__
    return "Error"
