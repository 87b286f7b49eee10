"""Avro's binary primitives that framing, skipping and bounds read without decoding a record:
zigzag varints and sized byte runs."""

from __future__ import annotations


def zigzag(data: bytes, pos: int) -> tuple[int, int]:
    """An Avro int or long (zigzag varint) at ``pos``, and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise EOFError("Expected 1 bytes, read 0")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


def advance(data: bytes, pos: int, size: int) -> int:
    """The position ``size`` bytes after ``pos``; EOFError (fastavro's words for the same
    bytes) if ``data`` ends before."""
    end = pos + size
    if size < 0 or end > len(data):
        available = max(0, len(data) - pos)
        read = available if size < 0 else min(size, available)
        raise EOFError(f"Expected {size} bytes, read {read}")
    return end


def skip_sized(data: bytes, pos: int) -> int:
    """Strings and bytes: a length, then that many bytes."""
    size, pos = zigzag(data, pos)
    return advance(data, pos, size)
