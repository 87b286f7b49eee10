"""Avro object containers, for Kafka messages and files alike: the header, the blocks, their
codecs (:mod:`~mlflow_preproc.runtime.avro_codecs`) and bounds. Both readers of the codec
table (the header's codec check, the block's inflating) are here."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Collection, Iterator
from typing import IO

import fastavro

from mlflow_preproc.config import MAX_DECODED_BYTES_DEFAULT
from mlflow_preproc.runtime.avro_binary import zigzag
from mlflow_preproc.runtime.avro_bounds import MAX_SCHEMA_TEXT_BYTES
from mlflow_preproc.runtime.avro_codecs import CODECS, inflate
from mlflow_preproc.runtime.dependencies import Misconfigured
from mlflow_preproc.runtime.formats.avro_records import _RecordReader
from mlflow_preproc.runtime.formats.base import BlockTooLarge, DecodeError, Record
from mlflow_preproc.runtime.input_fields import Tree

OCF_MAGIC = b"Obj\x01"
# The header of an Avro object container file, as the Avro spec writes it.
OCF_HEADER_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "org.apache.avro.file.Header", "fields": [
        {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
        {"name": "meta", "type": {"type": "map", "values": "bytes"}},
        {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": 16}}]})


class _ContainerReader:
    """Reads Avro object containers sent as single messages, parsing each writer schema once.

    Alert streams (ZTF, Fink) send every alert as a whole container: a header carrying the
    ~20 kB schema, then one block. ``fastavro.reader`` parses that schema for every message,
    a third of the decode time of a ZTF alert; here a :class:`_RecordReader` is kept per
    schema text, and the last header is recognised by its bytes. Blocks are inflated by
    :mod:`~mlflow_preproc.runtime.avro_codecs`, within the bound.
    """

    _MAX_SCHEMAS = 64
    _RECENT_HEADERS = 4

    def __init__(self, skip: Collection[str] = (),
                 max_decoded_bytes: int = MAX_DECODED_BYTES_DEFAULT,
                 fields: Tree | None = None) -> None:
        self._skip = frozenset(skip)
        self._fields = fields
        self._limit = max_decoded_bytes
        self._readers: dict[bytes, _RecordReader] = {}
        # The header bytes before the sync marker of the last few containers read, with their
        # codec and reader: a stream's containers share them, so a message starting with the
        # same bytes needs no header decoding (the schema alone is ~20 kB to copy and hash).
        self._recent: list[tuple[bytes, bytes, _RecordReader]] = []

    def read(self, value: bytes) -> list[Record]:
        try:
            return self._read(value)
        except (DecodeError, Misconfigured):
            raise
        except Exception as exc:  # truncated or corrupt bytes fail anywhere inside fastavro
            raise DecodeError(f"corrupt Avro container ({type(exc).__name__}: {exc})") from None

    def _read(self, value: bytes) -> list[Record]:
        buf = io.BytesIO(value)
        known = next((h for h in self._recent if value.startswith(h[0])), None)
        if known is not None:
            prefix, codec, reader = known
            buf.seek(len(prefix))
            sync = buf.read(16)
            if len(sync) < 16:  # what fastavro says of a header cut short in the same place
                raise EOFError(f"Expected 16 bytes, read {len(sync)}")
        else:
            codec, text, sync = read_header(buf)
            reader = self._reader(text)
            self._recent = [(value[:buf.tell() - len(sync)], codec, reader),
                            *self._recent[:self._RECENT_HEADERS - 1]]
        records: list[Record] = []
        decoded = 0  # the bound is on the whole message: its blocks together
        while (block := _next_block(buf, codec, sync, self._limit, decoded)) is not None:
            count, data = block
            decoded += len(data)
            block_buf = io.BytesIO(data)
            records.extend(reader.read(data, block_buf) for _ in range(count))
            _check_consumed(block_buf, count)
        return records

    def _reader(self, text: bytes) -> _RecordReader:
        reader = self._readers.get(text)
        if reader is None:
            if len(self._readers) >= self._MAX_SCHEMAS:
                self._readers.clear()
            reader = self._readers[text] = _RecordReader(json.loads(text), self._skip,
                                                         self._fields, self._limit)
        return reader


def read_header(stream: IO[bytes]) -> tuple[bytes, bytes, bytes]:
    """The codec, schema text and sync marker of the container header at ``stream``, left
    after it. A header that is not one, names a codec no Avro library defines, or carries a
    schema text over :data:`~mlflow_preproc.runtime.avro_bounds.MAX_SCHEMA_TEXT_BYTES` raises
    :class:`DecodeError`; cut-short bytes raise EOFError."""
    bounded = _Bounded(stream, MAX_SCHEMA_TEXT_BYTES + _HEADER_ROOM)
    header = fastavro.schemaless_reader(bounded, OCF_HEADER_SCHEMA, None)
    if header["magic"] != OCF_MAGIC:
        raise DecodeError(f"it starts with {header['magic']!r}, not b'Obj\\x01'")
    meta = header["meta"]
    codec = meta.get("avro.codec", b"null")
    if codec not in CODECS:
        raise DecodeError(f"its blocks are compressed with {codec!r}, which is no Avro codec "
                          f"(known: {', '.join(c.decode() for c in CODECS)})")
    if "avro.schema" not in meta:
        raise DecodeError("its header has no avro.schema")
    return codec, meta["avro.schema"], header["sync"]


# A header holds the schema, the codec and a few other entries besides.
_HEADER_ROOM = 64 * 1024


class _Bounded:
    """``stream`` for reading a header: a read past ``limit`` bytes in all refuses the header
    (fastavro asks for as many bytes as a damaged length says, and a file would hand them)."""

    def __init__(self, stream: IO[bytes], limit: int):
        self._stream, self._left = stream, limit

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._left:
            raise DecodeError(f"its header is over {MAX_SCHEMA_TEXT_BYTES + _HEADER_ROOM} "
                              "bytes, the bound of a container header (a schema text of at "
                              f"most {MAX_SCHEMA_TEXT_BYTES} bytes)")
        data = self._stream.read(size)
        self._left -= len(data)
        return data


def _next_block(buf: IO[bytes], codec: bytes, sync: bytes, limit: int, decoded: int = 0
                ) -> tuple[int, bytes] | None:
    """The record count and decoded bytes of the container block at ``buf``; None at the end.

    A block whose bytes, compressed or decoded, would take the ``decoded`` bytes so far past
    ``limit`` raises :class:`BlockTooLarge`, ``buf`` then after the block. Truncated or
    corrupt framing raises EOFError or :class:`DecodeError`.
    """
    first = buf.read(1)
    if not first:
        return None
    count, size = _read_long(buf, first), _read_long(buf)
    if count < 0 or size < 0:
        raise DecodeError("corrupt Avro container (a block with a negative record count or "
                          "size)")
    budget = limit - decoded
    data = None
    if size <= budget:
        data = buf.read(size)
        if len(data) < size:
            raise EOFError(f"Expected {size} bytes, read {len(data)}")
        if codec != b"null":
            data = inflate(codec, data, budget)
    else:
        _step_over(buf, size)  # not even read into memory
    if buf.read(16) != sync:
        raise DecodeError("corrupt Avro container (a block does not end with the file's sync "
                          "marker)")
    if data is None:
        raise BlockTooLarge(count, limit)
    if count > max(len(data), 1):
        # Only a schema that encodes to no bytes at all (a record of nulls) fits more records
        # than bytes; a count past that is damage, and decoding it would loop on empty
        # records until memory ran out.
        raise DecodeError(f"corrupt Avro container (a block of {len(data)} bytes cannot hold "
                          f"{count} records)")
    return count, data


def _check_consumed(block: io.BytesIO, count: int) -> None:
    """A block's records end where the block does; bytes after them are damage (polars-avro
    would loop on them for ever, fastavro would not notice)."""
    left = len(block.getbuffer()) - block.tell()
    if left:
        raise DecodeError(f"corrupt Avro container (a block holds {left} byte(s) after its "
                          f"{count} record(s))")


def _read_long(buf: IO[bytes], first: bytes = b"") -> int:
    """An Avro long (zigzag varint) read from ``buf``, whose first byte may be read already."""
    data = first or buf.read(1)
    while data[-1:] >= b"\x80" and len(data) < 10:
        more = buf.read(1)
        if not more:  # the bytes end inside it (without this check: a loop for ever)
            raise EOFError("the bytes end inside a varint")
        data += more
    return zigzag(data, 0)[0]


def _step_over(buf: IO[bytes], size: int) -> None:
    """Move ``buf`` on by ``size`` bytes, holding at most 1 MiB of them at a time."""
    while size > 0:
        chunk = len(buf.read(min(size, 1 << 20)))
        if not chunk:
            raise EOFError(f"Expected {size} bytes, read 0")
        size -= chunk



# (schema text, [(record count, decoded block)]) -> each block's records, or None
BlockReader = Callable[[bytes, list[tuple[int, bytes]]], list[list[Record] | None]]
# Blocks read ahead for the column reader: about a batch of records, within this many bytes.
_AHEAD_RECORDS = 1000
_AHEAD_BYTES = 64 * 1024 * 1024


def _avro_file(stream: IO[bytes], where: str, limit: int, fields: Tree | None = None,
               columns: BlockReader | None = None) -> Iterator[Record | DecodeError]:
    start = _Start(stream)
    try:
        codec, text, sync = read_header(start)
        reader = _file_reader(text, fields, limit)
    except Exception as exc:  # noqa: BLE001 -- fastavro raises many types on a bad header
        detail = str(exc) if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"
        if start.read_bytes == 0:
            yield DecodeError(f"{where} is empty (no Avro container header)")
        elif isinstance(exc, EOFError) and OCF_MAGIC.startswith(start.head[:4]):
            yield DecodeError(f"{where} is cut short: it ends {start.read_bytes} bytes into "
                              f"its Avro container header ({detail}); no record of it can be "
                              "read, copy it again")
        else:
            yield DecodeError(f"{where} is not an Avro object container file ({detail})")
        return
    count = 0
    ahead: list[tuple[int, bytes]] = []  # blocks read, not yet decoded (with columns)
    ahead_records = ahead_bytes = 0
    while True:
        try:
            block = _next_block(stream, codec, sync, limit)
        except BlockTooLarge as exc:
            for record in _decoded_blocks(ahead, columns, text, reader, where, count):
                count += not isinstance(record, DecodeError)
                yield record
            ahead, ahead_records, ahead_bytes = [], 0, 0
            yield BlockTooLarge(exc.count, exc.limit, f"{where}: after record {count}, ")
            continue
        except Misconfigured:
            raise  # a codec's package missing here: every block would fail alike
        except Exception as exc:  # noqa: BLE001 -- truncated/corrupt framing: EOFError,
            # zlib.error, LZMAError... whatever the bytes make the codec do
            for record in _decoded_blocks(ahead, columns, text, reader, where, count):
                count += not isinstance(record, DecodeError)
                yield record
            yield _damaged(where, count, exc)
            return
        if block is not None and columns is not None:
            ahead.append(block)
            ahead_records += block[0]
            ahead_bytes += len(block[1])
            if ahead_records < _AHEAD_RECORDS and ahead_bytes < _AHEAD_BYTES:
                continue
        elif block is not None:
            ahead = [block]
        for record in _decoded_blocks(ahead, columns, text, reader, where, count):
            count += not isinstance(record, DecodeError)
            yield record
        ahead, ahead_records, ahead_bytes = [], 0, 0
        if block is None:
            return


def _decoded_blocks(blocks: list[tuple[int, bytes]], columns: BlockReader | None,
                    text: bytes, reader: _RecordReader, where: str, count: int
                    ) -> Iterator[Record | DecodeError]:
    """The records of ``blocks``: read by ``columns`` at once where it takes them, else
    decoded here, where a corrupt record ends its block with one error (the block ended with
    its sync marker, so the next one can still be read)."""
    read = columns(text, blocks) if columns is not None and blocks else None
    for i, (n, data) in enumerate(blocks):
        if read is not None and read[i] is not None:
            yield from read[i]
            count += n
            continue
        buf = io.BytesIO(data)
        for done in range(n):
            try:
                record = reader.read(data, buf)
            except Exception as exc:  # noqa: BLE001 -- IndexError, ValueError, EOFError...
                yield DecodeError(f"{where}: after record {count}, {n - done} Avro record(s) "
                                  f"of a block are corrupt ({type(exc).__name__}: {exc}); the "
                                  "next blocks are read")
                break
            yield record
            count += 1


class _Start:
    """``stream`` for reading a file's header, keeping how many bytes it had and its first
    four: a header cut short is told from bytes that are no header."""

    def __init__(self, stream: IO[bytes]):
        self._stream, self.head, self.read_bytes = stream, b"", 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.head += data[:max(0, 4 - len(self.head))]
        self.read_bytes += len(data)
        return data


# Readers of the files' writer schemas, by schema text and declared fields: an archive of
# one-alert files (ZTF's) has one schema per version, and parsing it and deriving the
# projection took more time than decoding the alert (benchmarks/avro_decoders.py, files).
_FILE_READERS: dict[tuple[bytes, str, int], _RecordReader] = {}
_MAX_FILE_READERS = 64


def _file_reader(schema_text: bytes, fields: Tree | None, limit: int) -> _RecordReader:
    key = (schema_text, json.dumps(fields, sort_keys=True), limit)
    reader = _FILE_READERS.get(key)
    if reader is None:
        if len(_FILE_READERS) >= _MAX_FILE_READERS:
            _FILE_READERS.clear()
        reader = _FILE_READERS[key] = _RecordReader(json.loads(schema_text), (), fields, limit)
    return reader


def _damaged(where: str, count: int, exc: Exception) -> DecodeError:
    return DecodeError(f"{where} is damaged after record {count} ({type(exc).__name__}: "
                       f"{exc}); the rest of the file is skipped")
