"""What every format shares: the record type, which formats are read and written where, the
errors of decoding and encoding, and field dropping."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

Record = dict[str, Any]

# The formats of files, read and written (the package's docstring says what each is). Those
# of Kafka message values, in and out, are config.MESSAGE_FORMATS: config keeps them as the
# choices of INPUT_FORMAT and OUTPUT_FORMAT, since it loads before anything heavy.
FILE_FORMATS = ("avro", "json", "jsonl")


class DecodeError(ValueError):
    """Bytes that cannot be read as records in the configured format.

    ``raw`` holds the rejected bytes where they are one record's (a JSON line), so a rejects
    file can keep what it rejected.
    """

    def __init__(self, message: str, raw: bytes | None = None):
        super().__init__(message)
        self.raw = raw

    def raw_text(self) -> str | None:
        """The rejected bytes as text (bytes that are not UTF-8 escaped), else None."""
        return None if self.raw is None else self.raw.decode("utf-8", "backslashreplace")


class BlockTooLarge(DecodeError):
    """An Avro container block over MAX_DECODED_BYTES, stepped over: the blocks after it
    can still be read. ``place`` starts the message (``alerts.avro: after record 5, ``)."""

    def __init__(self, count: int, limit: int, place: str = ""):
        super().__init__(f"{place}{count} Avro record(s) decode to more than "
                         f"MAX_DECODED_BYTES={limit} bytes; raise MAX_DECODED_BYTES if records "
                         "this large are expected and the memory limit allows")
        self.count, self.limit = count, limit


class EncodeError(ValueError):
    """A record that cannot be written in the configured format."""


def drop_fields(record: Record, paths: Iterable[str]) -> Record:
    """Remove dotted field paths (``cutoutScience``, ``candidate.pdiffimfilename``) in place.

    Missing fields are ignored: alerts of different schema versions carry different fields.
    """
    for path in paths:
        *parents, leaf = path.split(".")
        node: Any = record
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return record


def _without(record: Record, names: Collection[str]) -> Record:
    """``record`` without the top-level fields ``names`` (in place)."""
    for name in names:
        record.pop(name, None)
    return record
