"""The codecs of Avro container blocks, each decompressing one block within a bound.

A compressed block of 30 kB can inflate to hundreds of MB, and fastavro inflates whatever a
block says. Here every codec refuses a block that decodes to more than its bound
(``MAX_DECODED_BYTES``) before it holds more than the bound: the stream codecs (deflate,
bzip2, xz, zstandard) are inflated in pieces; snappy and lz4 say their size first, which is
checked before anything is allocated.

The standard library has deflate, bzip2 and xz. snappy (``cramjam``, as fastavro reads it),
zstandard (``backports.zstd`` before Python 3.14) and lz4 (``lz4``) are packages of their
own: a block in a codec whose package is missing here is this installation's problem, not
the record's, and :func:`inflate` raises
:class:`~mlflow_preproc.runtime.dependencies.Misconfigured` naming the package (a stream
stops with exit 2 rather than dead-letter every record of that codec).
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from typing import Any

from mlflow_preproc.runtime.dependencies import Misconfigured

# (codec, limit) -> decoded bytes, or None when they would be more than the limit
Inflater = Callable[[bytes, int], "bytes | None"]


class CorruptBlock(ValueError):
    """A compressed block that does not decompress (cut short, a bad checksum...)."""


def _pieces(make: Callable[[], Any], codec: str) -> Inflater:
    """A stream codec, inflated in pieces of 1 MiB so that refusing a block holds no more
    than the bound."""
    def inflate(data: bytes, limit: int) -> bytes | None:
        decompressor = make()
        pieces: list[bytes] = []
        size = 0
        while not decompressor.eof:
            piece = decompressor.decompress(data, 1 << 20)
            # zlib hands back the input it did not take yet; the others keep it themselves
            data = getattr(decompressor, "unconsumed_tail", b"")
            if not piece and not data and getattr(decompressor, "needs_input", True):
                raise CorruptBlock(f"a {codec} block is cut short")
            size += len(piece)
            if size > limit:
                return None
            pieces.append(piece)
        return b"".join(pieces)
    return inflate


def _snappy(decompress_raw: Callable[[bytes], Any]) -> Inflater:
    def inflate(data: bytes, limit: int) -> bytes | None:
        # Avro's snappy block: raw snappy (its decoded length first), then the CRC-32 of the
        # decoded bytes, big-endian.
        if len(data) < 5:
            raise CorruptBlock("a snappy block is cut short")
        compressed, (crc,) = data[:-4], struct.unpack(">I", data[-4:])
        size, _ = zigzag_unsigned(compressed)
        if size > limit:
            return None
        try:
            decoded = bytes(decompress_raw(compressed))
        except Exception as exc:  # noqa: BLE001 -- cramjam raises its own error types
            raise CorruptBlock(f"a snappy block does not decompress ({exc})") from None
        if zlib.crc32(decoded) != crc:
            raise CorruptBlock("a snappy block's checksum does not match its bytes")
        return decoded
    return inflate


def _lz4(block: Any) -> Inflater:
    def inflate(data: bytes, limit: int) -> bytes | None:
        # fastavro's lz4 block: the decoded size as 4 bytes, little-endian, then the block.
        if len(data) < 4:
            raise CorruptBlock("an lz4 block is cut short")
        (size,) = struct.unpack("<I", data[:4])
        if size > limit:
            return None
        try:
            return block.decompress(data)
        except Exception as exc:  # noqa: BLE001 -- LZ4BlockError
            raise CorruptBlock(f"an lz4 block does not decompress ({exc})") from None
    return inflate


def zigzag_unsigned(data: bytes) -> tuple[int, int]:
    """An unsigned varint (snappy's length) at the start of ``data``."""
    result = shift = pos = 0
    while True:
        if pos >= len(data) or pos > 9:
            raise CorruptBlock("a snappy block's length is cut short")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _missing(codec: str, package: str) -> Inflater:
    def inflate(data: bytes, limit: int) -> bytes | None:
        raise Misconfigured(f"Avro blocks compressed with {codec} need the {package} package, "
                            f"which is not installed here; pip install {package} (in an image: "
                            f"add {package} to the model's requirements)")
    return inflate


def _zstd() -> Inflater:
    try:
        try:
            from compression import zstd  # Python 3.14
        except ImportError:
            from backports import zstd
    except ImportError:
        return _missing("zstandard", "backports.zstd")
    return _pieces(zstd.ZstdDecompressor, "zstandard")


def _snappy_codec() -> Inflater:
    try:
        from cramjam import snappy
    except ImportError:
        return _missing("snappy", "cramjam")
    return _snappy(snappy.decompress_raw)


def _lz4_codec() -> Inflater:
    try:
        import lz4.block
    except ImportError:
        return _missing("lz4", "lz4")
    return _lz4(lz4.block)


# The Avro specification's codecs, and fastavro's lz4. Raw deflate, as the spec says; bzip2
# and xz are whole streams.
INFLATERS: dict[bytes, Inflater] = {
    b"deflate": _pieces(lambda: zlib.decompressobj(-15), "deflate"),
    b"bzip2": _pieces(bz2.BZ2Decompressor, "bzip2"),
    b"xz": _pieces(lzma.LZMADecompressor, "xz"),
    b"zstandard": _zstd(),
    b"snappy": _snappy_codec(),
    b"lz4": _lz4_codec(),
}
CODECS = (b"null", *INFLATERS)


def inflate(codec: bytes, data: bytes, limit: int) -> bytes | None:
    """``data``, a block in ``codec``, decompressed; None if it decodes to more than
    ``limit`` bytes. :class:`CorruptBlock` if it does not decompress, Misconfigured if the
    codec's package is missing, KeyError for a codec that is none of :data:`CODECS`."""
    try:
        return INFLATERS[codec](data, limit)
    except (CorruptBlock, Misconfigured):
        raise
    except (zlib.error, OSError, EOFError, ValueError) as exc:  # lzma, bz2, zstd errors
        raise CorruptBlock(f"a {codec.decode(errors='replace')} block does not decompress "
                           f"({type(exc).__name__}: {exc})") from None
