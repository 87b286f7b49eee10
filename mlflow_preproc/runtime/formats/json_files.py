"""JSON files read incrementally: JSON Lines (a value may spread over lines) and JSON arrays,
where one damaged line or item is one bad record, not the file."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import IO, Any

from orjson import loads  # strict and fast; its errors are ValueErrors

from mlflow_preproc.runtime.formats.base import DecodeError, Record
from mlflow_preproc.runtime.jsonable import dumps
from mlflow_preproc.runtime.model_input import scoring_records

# A JSON value spread over lines is gathered up to this size; past it, it is a bad record.
_MAX_SPREAD_BYTES = 64 * 1024 * 1024


def _json_lines(stream: IO[bytes], where: str, one_per_line: bool
                ) -> Iterator[Record | DecodeError]:
    """JSON Lines, where a line that is not valid JSON is one bad record, whatever its place.

    With ``one_per_line`` (``jsonl``) every line is one value. Otherwise (``json``) a line
    that is the unfinished start of a JSON value (``{`` of a pretty-printed object) is joined
    with the next ones until the value is complete. When a later line cannot continue it, or
    is a whole object on its own at the start of the line (the next record of a JSON Lines
    file after a truncated one), the unfinished lines are one bad record and that line is
    read on its own, so a truncated line never takes a good one with it.
    """
    pending, first = b"", 0
    for line_no, line in enumerate(stream, 1):
        if not pending:
            if not line.strip():
                continue
            first = line_no
        value, error = _parse(pending + line)
        if pending and error is _UNFINISHED and _is_object_line(line):
            error = "the next line starts a new object"
        if error is _UNFINISHED and not one_per_line and \
                len(pending) + len(line) < _MAX_SPREAD_BYTES:
            pending += line
            continue
        if error is not None and pending:
            yield _never_ends(where, first, line_no - 1, pending)
            pending, first = b"", line_no
            value, error = _parse(line)
            if error is _UNFINISHED and not one_per_line:
                pending = line
                continue
        text, pending = pending + line, b""
        if error is not None:
            if error is _UNFINISHED:
                yield _never_ends(where, first, line_no, text)
            else:
                yield DecodeError(f"{where} {_lines(first, line_no)} is not valid JSON ({error})",
                                  text)
        elif not one_per_line and (wrapped := scoring_records(value)) is not None:
            yield from _items(wrapped, f"{where} {_lines(first, line_no)}")
        elif isinstance(value, dict):
            yield value
        else:
            yield DecodeError(f"{where} {_lines(first, line_no)} is a JSON "
                              f"{type(value).__name__}, not an object", text)
    if pending:
        yield DecodeError(f"{where} ends inside a JSON value started on line {first}", pending)


def _items(values: list[Any], where: str) -> Iterator[Record | DecodeError]:
    """The records of a scoring payload; an item that is no object is one bad record."""
    for index, item in enumerate(values):
        if isinstance(item, dict):
            yield item
        else:
            yield DecodeError(f"{where}, item {index} of the scoring payload, is a JSON "
                              f"{type(item).__name__}, not an object", dumps(item))


def _never_ends(where: str, first: int, last: int, text: bytes) -> DecodeError:
    return DecodeError(f"{where} {_lines(first, last)} is not valid JSON (a JSON value that "
                       "never ends)", text)


def _is_object_line(line: bytes) -> bool:
    """A line that is a whole JSON object and starts with its ``{``: a JSON Lines record.

    A pretty-printed object's inner lines are indented, or are not whole objects.
    """
    return line[:1] == b"{" and _parse(line)[1] is None


_UNFINISHED = "unfinished"


def _parse(text: bytes) -> tuple[Any, str | None]:
    try:
        return loads(text), None
    except ValueError as exc:  # orjson.JSONDecodeError
        if getattr(exc, "pos", -1) >= len(text.rstrip()):
            return None, _UNFINISHED  # valid so far: the value goes on in the next line
        return None, str(exc)


def _lines(first: int, last: int) -> str:
    return f"line {first}" if first == last else f"lines {first}-{last}"


def _peek_nonspace(stream: IO[bytes]) -> bytes:
    peek = getattr(stream, "peek", None)
    head = peek(64) if peek else b""
    return head.lstrip()[:1]


def _json_array(stream: IO[bytes], where: str) -> Iterator[Record | DecodeError]:
    """A JSON array, parsed incrementally.

    If it fails before its first object, it may be no array but JSON Lines whose first line
    is damaged into starting with ``[`` (a ``{`` with one bit flipped): the bytes read so far
    are replayed and the input is read as lines, so one bad line does not take the file.
    """
    import ijson

    head = _Recording(stream)
    held: list[DecodeError] = []  # rejects of items before the first object, while undecided
    index = -1
    try:
        for index, item in enumerate(ijson.items(head, "item", use_float=True)):
            if isinstance(item, dict):
                head.recorded = None  # an array of records: damage from here on is its own
            else:
                held.append(DecodeError(f"{where} item {index} is a JSON "
                                        f"{type(item).__name__}, not an object"))
            if head.recorded is None:
                yield from held
                held.clear()
            if isinstance(item, dict):
                yield item
        yield from held
    except ijson.JSONError as exc:
        if head.recorded is not None:
            replayed = io.BufferedReader(_Replayed(bytes(head.recorded), stream))
            yield from _json_lines(replayed, where, one_per_line=False)
            return
        yield DecodeError(f"{where} is not valid JSON after item {index} ({exc}); the rest of "
                          "the file is skipped")


class _Recording:
    """A binary stream that keeps what is read from it, up to ``_MAX_SPREAD_BYTES``."""

    def __init__(self, stream: IO[bytes]):
        self._stream = stream
        self.recorded: bytearray | None = bytearray()  # None: no longer recording

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if self.recorded is not None:
            self.recorded += data
            if len(self.recorded) > _MAX_SPREAD_BYTES:
                self.recorded = None
        return data


class _Replayed(io.RawIOBase):
    """``head``, then the rest of ``stream``: a stream read again from its start."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self._head = memoryview(head)
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
