"""Fuzzes every decoder of the package apart from pytest, under a memory limit: run by
tests/test_fuzz_bounds.py in a subprocess (``python tests/fuzz_decoders.py [examples]``).

Each input, real messages and files damaged by hypothesis (bytes flipped, inserted, cut,
counts and lengths replaced by huge varints), must end as records or a DecodeError within
the time bound, without a MemoryError under ``RLIMIT_AS``: never another exception, a hang
or an allocation past the bound (#32: "every decoder has a per-message budget").
"""

from __future__ import annotations

import io
import json
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path

MEMORY_LIMIT = 2 << 30  # the process, polars included, stays far below with the bounds
SECONDS_PER_INPUT = 5.0  # a decode takes milliseconds; seconds mean a loop


def main(examples: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import fastavro
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from mlflow_preproc.config import ZTF_CUTOUTS
    from mlflow_preproc.runtime.formats import DecodeError, MessageDecoder, read_records
    from mlflow_preproc.runtime.input_fields import parse

    data = Path(__file__).parent / "data"
    alert = (data / "472263571115115000.avro").read_bytes()
    with open(data / "472263571115115000.avro", "rb") as f:
        reader = fastavro.reader(f)
        schema, record = reader.writer_schema, next(reader)
    small = {k: v for k, v in record.items() if not k.startswith("cutout")}
    schemaless = io.BytesIO()
    fastavro.schemaless_writer(schemaless, fastavro.parse_schema(schema), record)
    folder = tempfile.mkdtemp()
    Path(folder, "7.avsc").write_text(json.dumps(schema))
    many = io.BytesIO()
    fastavro.writer(many, schema, [dict(record, candid=i) for i in range(4)], codec="deflate",
                    sync_interval=len(alert))
    lines = b"".join(json.dumps(small, default=str).encode() + b"\n" for _ in range(3))
    # A writer schema whose items take no bytes: only a bound on counts keeps it small.
    nulls_schema = {"type": "record", "name": "N", "fields": [
        {"name": "id", "type": "long"}, {"name": "nulls", "type": {"type": "array",
                                                                   "items": "null"}}]}
    nulls = io.BytesIO()
    fastavro.writer(nulls, nulls_schema, [{"id": 1, "nulls": [None] * 3}])

    def messages(decoder):
        return lambda value: decoder.decode(value)

    def files(fmt):
        return lambda value: [r for r in read_records(io.BytesIO(value), fmt, "f")
                              if not isinstance(r, DecodeError)]

    fields = parse(["objectId", "candidate.magpsf", "prv_candidates.jd"])
    targets = [
        ("container", alert, messages(MessageDecoder("avro"))),
        ("container, cutouts skipped", alert,
         messages(MessageDecoder("avro", skip=ZTF_CUTOUTS))),
        ("container, declared fields", alert, messages(MessageDecoder("avro", fields=fields))),
        ("container of zero-width items", nulls.getvalue(), messages(MessageDecoder("avro"))),
        ("container of zero-width items, skipped", nulls.getvalue(),
         messages(MessageDecoder("avro", skip=["nulls"]))),
        ("schemaless", schemaless.getvalue(), messages(MessageDecoder("avro", schema))),
        ("confluent", struct.pack(">bI", 0, 7) + schemaless.getvalue(),
         messages(MessageDecoder("confluent-avro", schema_dir=folder))),
        ("json", json.dumps(small, default=str).encode(), messages(MessageDecoder("json"))),
        ("avro file", many.getvalue(), files("avro")),
        ("json lines file", lines, files("json")),
    ]
    try:
        from mlflow_preproc.runtime.avro_columns import ColumnReader, installed
    except ImportError:
        installed = lambda: False  # noqa: E731
    if installed():
        ColumnReader.BUDGET_S = 1.0  # a read that never returns: given up on, not waited for
        columns = [ColumnReader(fields)]

        def read_columns(value):
            if getattr(columns[0], "stuck", None) and len(columns) < 3:
                columns.insert(0, ColumnReader(fields))  # at most 3 threads left spinning
            return columns[0].records([value, alert])[0]
        targets.append(("column reader", alert, read_columns))

    def long(n: int) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, fastavro.parse_schema("long"), n)
        return out.getvalue()

    def reframed(value: bytes, change) -> bytes:
        """A one-block container whose block data is ``change(data)``, its size said to
        match: damage inside the records that the framing does not give away (a count of
        2^62 zero-width items; bytes after the records, which polars-avro looped on)."""
        from mlflow_preproc.runtime.formats import zigzag

        try:
            sync = fastavro.reader(io.BytesIO(value))._header["sync"]
            at = value.index(sync) + 16
            count, pos = zigzag(value, at)
            size, pos = zigzag(value, pos)
        except Exception:  # noqa: BLE001 -- damaged already: left as it is
            return value
        data = change(value[pos:pos + size])
        return value[:at] + long(count) + long(len(data)) + data + sync

    huge = [b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x80\x80\x80\x80\x80\x80\x80\x80\x80",
            b"\x81\x80\x80\x80\x04", b"\x7f", b"\x00"]

    @st.composite
    def damaged(draw, seed: bytes) -> bytes:
        value = bytearray(seed)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, max(len(value) - 1, 0)))
            kind = draw(st.sampled_from(["flip", "insert", "cut", "varint", "truncate",
                                         "repeat", "a record's varint", "bytes after"]))
            if kind == "a record's varint":
                where, put = draw(st.integers(0, 10**6)), draw(st.sampled_from(huge))
                value = bytearray(reframed(bytes(value), lambda d: d[:where % max(len(d), 1)] +
                                           put + d[where % max(len(d), 1) + 1:]))
            elif kind == "bytes after":
                extra = draw(st.binary(min_size=1, max_size=6))
                value = bytearray(reframed(bytes(value), lambda d: d + extra))
            elif kind == "flip" and value:
                value[at] ^= draw(st.integers(1, 255))
            elif kind == "insert":
                value[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "cut":
                del value[at:at + draw(st.integers(1, 16))]
            elif kind == "varint":
                value[at:at + draw(st.integers(1, 3))] = draw(st.sampled_from(huge))
            elif kind == "truncate":
                del value[at:]
            else:
                value[at:at] = value[at:at + draw(st.integers(1, 64))]
        return bytes(value)

    for name, seed, decode in targets:
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(value=damaged(seed))
        def fuzz(value: bytes) -> None:
            started = time.monotonic()
            try:
                out = decode(value)
            except DecodeError:
                out = None
            except MemoryError:
                raise AssertionError(f"{name}: MemoryError under {MEMORY_LIMIT} bytes on "
                                     f"{value.hex()}") from None
            took = time.monotonic() - started
            assert took < SECONDS_PER_INPUT, f"{name}: {took:.1f} s on {value.hex()}"
            assert out is None or isinstance(out, list), f"{name}: {out!r}"

        fuzz()
        print(f"{name}: {examples} damaged inputs, each records or a DecodeError", flush=True)
    print("ok")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
