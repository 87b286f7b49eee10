"""Record formats and the JSON rules, on real ZTF alert packets (fast, no servers)."""

from __future__ import annotations

import base64
import io
import json
import re
import struct

import fastavro
import pytest

from conftest import DATA
from mlflow_preproc.config import ZTF_CUTOUTS
from mlflow_preproc.runtime import formats
from mlflow_preproc.runtime.avro_schemas import SchemaError, load_avro_schema
from mlflow_preproc.runtime.formats import (
    DecodeError,
    EncodeError,
    FileWriter,
    MessageDecoder,
    MessageEncoder,
    drop_fields,
    read_records,
)
from verdict_cells import verdict

PACKET = DATA / "472263571115115000.avro"


def test_avro_container_message_decodes_like_the_file():
    raw = PACKET.read_bytes()
    [alert] = MessageDecoder("avro").decode(raw)
    with open(PACKET, "rb") as f:
        assert alert == next(fastavro.reader(f))
    assert alert["objectId"].startswith("ZTF")


CODECS = ["null", "deflate", "bzip2", "xz", "snappy", "zstandard", "lz4"]


@pytest.mark.parametrize("codec", CODECS)
def test_avro_container_messages_of_any_codec_and_many_records_decode_like_fastavro(codec):
    with open(PACKET, "rb") as f:
        reader = fastavro.reader(f)
        schema, alert = reader.writer_schema, next(reader)
    buf = io.BytesIO()
    # Several blocks of several records, as a producer batching alerts would write them.
    fastavro.writer(buf, schema, [dict(alert, candid=alert["candid"] + i) for i in range(7)],
                    codec=codec, sync_interval=3 * len(PACKET.read_bytes()))
    decoder = MessageDecoder("avro")
    for _ in range(2):  # the second time from the cached schema
        records = decoder.decode(buf.getvalue())
        assert [r["candid"] for r in records] == [alert["candid"] + i for i in range(7)]
        assert records == list(fastavro.reader(io.BytesIO(buf.getvalue())))


def test_truncated_or_corrupt_avro_container_is_a_decode_error():
    raw = PACKET.read_bytes()
    decoder = MessageDecoder("avro")
    with pytest.raises(DecodeError, match="corrupt Avro container"):
        decoder.decode(raw[:len(raw) // 2])
    with pytest.raises(DecodeError, match="sync marker"):
        decoder.decode(raw[:-1] + bytes([raw[-1] ^ 0xFF]))


def test_a_container_cut_inside_a_varint_is_a_decode_error_not_a_hang():
    # Found by fuzzing declared input fields: a message ending in a byte with the varint
    # continuation bit (b"\x80") looped for ever in the block header, stalling the stream.
    raw = PACKET.read_bytes()
    header_end = raw.index(fastavro.reader(io.BytesIO(raw))._header["sync"]) + 16
    decoder = MessageDecoder("avro")
    for value in (raw[:header_end] + b"\x80", raw[:header_end] + b"\x02\x80",
                  raw[:header_end] + b"\xff" * 9):
        with pytest.raises(DecodeError, match="corrupt Avro container"):
            decoder.decode(value)
    cut = io.BufferedReader(io.BytesIO(raw[:header_end] + b"\x80"))
    assert [type(r) for r in formats.read_records(cut, "avro", "f")] == [DecodeError]


PACKETS = sorted(DATA.glob("*.avro"))


def _decoded_then_dropped(container: bytes, names) -> list[dict]:
    """What skipping must equal: fastavro's whole decode, then the fields removed."""
    return [drop_fields(r, names) for r in fastavro.reader(io.BytesIO(container))]


def _long(n: int) -> bytes:
    """``n`` as Avro writes a long (zigzag varint)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema("long"), n)
    return buf.getvalue()


def _container(packet, codec: str, n: int = 1, **writer_args) -> bytes:
    """``n`` copies of the packet's alert (candid varied) in one container of ``codec``."""
    with open(packet, "rb") as f:
        reader = fastavro.reader(f)
        schema, alert = reader.writer_schema, next(reader)
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [dict(alert, candid=alert["candid"] + i) for i in range(n)],
                    codec=codec, **writer_args)
    return buf.getvalue()


@pytest.mark.parametrize("packet", PACKETS, ids=lambda p: p.stem)
def test_skipped_cutouts_equal_decode_then_drop_on_the_real_packets(packet):
    raw = packet.read_bytes()
    decoder = MessageDecoder("avro", skip=ZTF_CUTOUTS)
    for _ in range(2):  # then from the cached reader and the recognised header
        [alert] = decoder.decode(raw)
        [expected] = _decoded_then_dropped(raw, ZTF_CUTOUTS)
        assert alert == expected
        assert list(alert) == list(expected)  # same field order, too
        assert not set(ZTF_CUTOUTS) & set(alert)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("packet", PACKETS, ids=lambda p: p.stem)
def test_skipping_equals_decode_then_drop_for_each_codec_and_many_records(packet, codec):
    # Several blocks of several records, as a producer batching alerts would write them.
    raw = _container(packet, codec, n=7, sync_interval=3 * packet.stat().st_size)
    decoder = MessageDecoder("avro", skip=ZTF_CUTOUTS)
    for _ in range(2):
        assert decoder.decode(raw) == _decoded_then_dropped(raw, ZTF_CUTOUTS)


@pytest.mark.parametrize("skip", [
    ["prv_candidates"],                      # a run of kept fields on either side
    ["cutoutScience"],                       # defines the cutout type the kept ones refer to
    ["schemavsn", "candidate", "cutoutDifference"],
    ["candid", "no_such_field"],
])
def test_skipping_any_top_level_fields_equals_decode_then_drop(skip):
    raw = _container(PACKET, "null", n=3)
    assert MessageDecoder("avro", skip=skip).decode(raw) == _decoded_then_dropped(raw, skip)


@verdict("decode", "missing library or codec")
def test_a_codec_whose_package_is_missing_stops_with_the_package_named_not_a_dead_letter(
        tmp_path):
    # #32 finding 7: a zstandard container in an install without the package was a dead
    # letter ("corrupt Avro container ... you need to install ..."), so every valid record of
    # that codec was lost to the DLQ. Run where the codec packages cannot be imported.
    import subprocess
    import sys

    (tmp_path / "z.avro").write_bytes(_container(PACKET, "zstandard"))
    (tmp_path / "s.avro").write_bytes(_container(PACKET, "snappy"))
    script = """
import sys
for name in ("backports.zstd", "compression.zstd", "cramjam", "lz4", "lz4.block"):
    sys.modules[name] = None  # as if not installed
from mlflow_preproc.runtime.dependencies import Misconfigured
from mlflow_preproc.runtime.formats import MessageDecoder, read_records
for path, package in (("z.avro", "backports.zstd"), ("s.avro", "cramjam")):
    data = open(path, "rb").read()
    try:
        MessageDecoder("avro").decode(data)
    except Misconfigured as exc:
        assert f"pip install {package}" in str(exc), exc
    else:
        raise AssertionError("decoded without the package")
    try:
        list(read_records(open(path, "rb"), "avro", path))
    except Misconfigured as exc:
        assert f"pip install {package}" in str(exc), exc
    else:
        raise AssertionError("read without the package")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_a_container_naming_no_avro_codec_is_the_records_problem():
    raw = _container(PACKET, "deflate")
    renamed = raw.replace(b"\x0edeflate", b"\x0edeflat3", 1)  # same length, unknown codec
    assert renamed != raw
    with pytest.raises(DecodeError, match=r"compressed with b'deflat3', which is no Avro codec"):
        MessageDecoder("avro").decode(renamed)


def test_skipping_schemaless_and_confluent_avro(tmp_path):
    with open(PACKET, "rb") as f:
        reader = fastavro.reader(f)
        schema, alert = reader.writer_schema, next(reader)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), alert)
    expected = drop_fields(dict(alert), ZTF_CUTOUTS)
    assert MessageDecoder("avro", schema, skip=ZTF_CUTOUTS).decode(buf.getvalue()) == [expected]
    (tmp_path / "7.avsc").write_text(json.dumps(schema))
    decoder = MessageDecoder("confluent-avro", schema_dir=str(tmp_path), skip=ZTF_CUTOUTS)
    assert decoder.decode(struct.pack(">bI", 0, 7) + buf.getvalue()) == [expected]


def test_json_messages_lose_the_skipped_top_level_fields_too():
    decoder = MessageDecoder("json", skip=["cutoutScience", "candidate.rb"])
    assert decoder.decode(b'{"a": 1, "cutoutScience": "x", "candidate": {"rb": 1}}') == [
        {"a": 1, "candidate": {"rb": 1}}]  # nested paths are drop_fields' job


def test_every_avro_type_is_skipped_to_the_right_place():
    inner = {"type": "record", "name": "Inner", "fields": [
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["a", "b"]}},
        {"name": "f", "type": {"type": "fixed", "name": "F", "size": 3}},
        {"name": "m", "type": {"type": "map", "values": ["null", "double"]}},
        {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "next", "type": ["null", "Inner"]}]}  # recursive, by name
    schema = {"type": "record", "name": "Outer", "fields": [
        {"name": "keep1", "type": "string"},
        {"name": "skipped", "type": {"type": "array", "items": inner}},
        {"name": "flags", "type": {"type": "array", "items": "boolean"}},
        {"name": "keep2", "type": ["null", "Inner"]}]}
    leaf = {"e": "b", "f": b"xyz", "m": {"k": 1.5, "n": None}, "t": 1_700_000_000_000,
            "next": None}
    record = {"keep1": "é", "skipped": [leaf, dict(leaf, next=leaf)],
              "flags": [True, False], "keep2": leaf}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    whole = MessageDecoder("avro", schema).decode(buf.getvalue())[0]
    skipped = MessageDecoder("avro", schema, skip=["skipped", "flags"]).decode(buf.getvalue())
    assert skipped == [drop_fields(whole, ["skipped", "flags"])]


def test_arrays_written_with_block_sizes_are_jumped_whole():
    # Writers may prefix a block with its size in bytes (a negative item count, then the size).
    schema = {"type": "record", "name": "R", "fields": [
        {"name": "a", "type": {"type": "array", "items": "long"}}, {"name": "b", "type": "int"}]}
    items = b"\x02\x04\x06"  # 1, 2, 3 as zigzag varints
    value = b"\x05" + b"\x06" + items + b"\x00" + b"\x54"  # count -3, size 3, items, end; b=42
    assert MessageDecoder("avro", schema, skip=["a"]).decode(value) == [{"b": 42}]


@pytest.mark.parametrize("packet", PACKETS, ids=lambda p: p.stem)
def test_truncated_input_gives_the_same_decode_error_with_or_without_skipping(packet):
    raw = packet.read_bytes()
    whole, skipping = MessageDecoder("avro"), MessageDecoder("avro", skip=ZTF_CUTOUTS)
    skipping.decode(raw)  # so that cut headers meet the recognised-header path too

    def error(decoder: MessageDecoder, value: bytes) -> str:
        with pytest.raises(DecodeError) as info:
            decoder.decode(value)
        # fastavro names the stream it could not read from by its address.
        return re.sub(r" at 0x[0-9a-f]+", "", str(info.value))

    # Every 500th cut after the magic bytes, and cuts in the last cutout and the sync marker.
    for cut in [*range(4, len(raw), 500), len(raw) - 100, len(raw) - 17, len(raw) - 1]:
        message = error(whole, raw[:cut])
        assert message.startswith("corrupt Avro container")
        assert error(skipping, raw[:cut]) == message, cut


def test_corrupt_input_in_a_skipped_field_is_a_decode_error():
    raw = bytearray(PACKET.read_bytes())
    decoder = MessageDecoder("avro", skip=ZTF_CUTOUTS)
    [alert] = MessageDecoder("avro").decode(bytes(raw))
    # The length of the last cutout's stampData, made longer than what is left.
    stamp = alert["cutoutDifference"]["stampData"]
    at = bytes(raw).rindex(_long(len(stamp)) + stamp)
    raw[at:at + len(_long(len(stamp)))] = _long(len(stamp) + 1)
    with pytest.raises(DecodeError, match=rf"corrupt Avro container \(EOFError: Expected "
                                          rf"{len(stamp) + 1} bytes"):
        decoder.decode(bytes(raw))
    with pytest.raises(DecodeError, match="sync marker"):
        decoder.decode(PACKET.read_bytes()[:-1] + b"\x00")


def test_drop_fields_removes_cutouts_and_nested_paths_and_ignores_missing():
    [alert] = MessageDecoder("avro").decode(PACKET.read_bytes())
    drop_fields(alert, [*ZTF_CUTOUTS, "candidate.pdiffimfilename", "no.such.path"])
    assert not set(ZTF_CUTOUTS) & set(alert)
    assert "pdiffimfilename" not in alert["candidate"] and "magpsf" in alert["candidate"]


def test_ztf_schema_files_load_as_one_document_and_decode_schemaless():
    schema = load_avro_schema(DATA / "alert.avsc")
    with open(DATA / "2019_01_10_739260766315010006.avro", "rb") as f:
        reader = fastavro.reader(f)
        writer_schema, alert = reader.writer_schema, next(reader)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer_schema), alert)
    assert MessageDecoder("avro", writer_schema).decode(buf.getvalue()) == [alert]
    assert schema["fields"][4]["type"]["name"] == "candidate"


def test_schemaless_avro_without_a_schema_names_the_fix():
    with pytest.raises(DecodeError, match="set AVRO_SCHEMA_PATH or log the model with avro_schema"):
        MessageDecoder("avro").decode(b"\x02\x04")


def test_wrong_schema_is_detected_not_silently_misread():
    schema = {"type": "record", "name": "A", "fields": [{"name": "a", "type": "long"}]}
    with pytest.raises(DecodeError, match="bytes unread"):
        MessageDecoder("avro", schema).decode(b"\x02\x02\x02")


def test_json_message_must_be_an_object():
    assert MessageDecoder("json").decode(b'{"a": 1}') == [{"a": 1}]
    with pytest.raises(DecodeError, match="is a JSON list, not an object"):
        MessageDecoder("json").decode(b"[1, 2]")
    with pytest.raises(DecodeError, match="tombstone"):
        MessageDecoder("json").decode(None)


def test_confluent_framing_requires_magic_byte(tmp_path):
    decoder = MessageDecoder("confluent-avro", schema_dir=str(tmp_path))
    with pytest.raises(DecodeError, match="not in the Confluent wire format"):
        decoder.decode(b"\x01\x00\x00\x00\x01\x02")
    with pytest.raises(DecodeError, match="no schema with id 1"):
        decoder.decode(struct.pack(">bI", 0, 1) + b"\x02")


def test_json_encoder_rules():
    value = MessageEncoder("json").encode({"b": b"\x00\x01", "nan": float("nan"), "t": (1, 2)})
    assert json.loads(value) == {"b": base64.b64encode(b"\x00\x01").decode(), "nan": None,
                                 "t": [1, 2]}
    with pytest.raises(EncodeError):
        MessageEncoder("json").encode({"x": object()})


def test_avro_encoder_reports_schema_mismatch():
    schema = {"type": "record", "name": "A", "fields": [{"name": "a", "type": "long"}]}
    with pytest.raises(EncodeError, match="does not match the output Avro schema"):
        MessageEncoder("avro", schema).encode({"a": "text"})
    with pytest.raises(ValueError, match="needs an output schema"):
        MessageEncoder("avro")


def test_file_reader_handles_jsonl_arrays_objects_and_bad_lines():
    def read(data: bytes, fmt: str = "json"):
        return [r if isinstance(r, dict) else str(r)
                for r in read_records(io.BufferedReader(io.BytesIO(data)), fmt, "in")]

    assert read(b'{"a":1}\n\n{"a":2}\n') == [{"a": 1}, {"a": 2}]
    assert read(b' [{"a":1.5}, {"a":2}]') == [{"a": 1.5}, {"a": 2}]
    assert read(b'{\n  "a": 1\n}\n') == [{"a": 1}]
    good, not_object, bad = read(b'{"a":1}\n[1]\n{bad\n', "jsonl")
    assert (good, not_object) == ({"a": 1}, "in line 2 is a JSON list, not an object")
    assert bad.startswith("in line 3 is not valid JSON")
    assert read(b'[{"a":1}, 3]')[1] == "in item 1 is a JSON int, not an object"


def test_avro_file_writer_round_trip():
    schema = {"type": "record", "name": "A", "fields": [{"name": "a", "type": "long"}]}
    buf = io.BytesIO()
    writer = FileWriter(buf, "avro", schema)
    writer.write({"a": 1})
    writer.close()
    buf.seek(0)
    assert list(fastavro.reader(buf)) == [{"a": 1}]


def test_bad_schema_file_names_the_problem(tmp_path):
    (tmp_path / "s.avsc").write_text('{"type": "record", "name": "A", "fields": [{"name": "a"}]}')
    with pytest.raises(SchemaError, match="invalid Avro schema"):
        load_avro_schema(tmp_path / "s.avsc")
    with pytest.raises(SchemaError, match="does not exist"):
        load_avro_schema(tmp_path / "missing.avsc")


def test_a_record_rejected_by_the_avro_file_writer_leaves_no_bytes_behind():
    # "b" fails after "a" is written: its partial bytes must not stay in the block, where
    # the next record would read back shifted and the one after would be lost.
    schema = {"type": "record", "name": "A", "fields": [{"name": "a", "type": "long"},
                                                        {"name": "b", "type": "string"}]}
    buf = io.BytesIO()
    writer = FileWriter(buf, "avro", schema)
    writer.write({"a": 1, "b": "one"})
    with pytest.raises(EncodeError, match="does not match the output Avro schema"):
        writer.write({"a": 99, "b": 5})
    writer.write({"a": 2, "b": "two"})
    writer.write({"a": 3, "b": "three"})
    writer.close()
    buf.seek(0)
    assert list(fastavro.reader(buf)) == [{"a": 1, "b": "one"}, {"a": 2, "b": "two"},
                                          {"a": 3, "b": "three"}]


def _read_jsonl(data: bytes, fmt: str):
    return list(read_records(io.BufferedReader(io.BytesIO(data)), fmt, "in"))


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_a_line_cut_mid_object_is_one_reject_with_its_text_and_the_next_line_is_read(fmt):
    cut = b'{"id": "broken", "candidate": {"ra": 1.5, "x": '
    data = b'{"id": 1}\n' + cut + b'\n{"id": 3, "x": 3}\n{"id": 4}\n'
    good, bad, *rest = _read_jsonl(data, fmt)
    assert good == {"id": 1}
    assert isinstance(bad, DecodeError)
    assert str(bad) == "in line 2 is not valid JSON (a JSON value that never ends)"
    assert bad.raw == cut + b"\n"
    assert rest == [{"id": 3, "x": 3}, {"id": 4}]


def test_json_lines_are_one_value_per_line_and_pretty_printed_json_still_reads_whole():
    [bad, good] = _read_jsonl(b'{\n"a": 1}\n', "jsonl")
    assert str(bad) == "in line 1 is not valid JSON (a JSON value that never ends)"
    assert str(good).startswith("in line 2 is not valid JSON")
    pretty = b'{\n  "items": [\n    {"b": 1},\n    {"b": 2}\n  ]\n}\n{"c": 3}\n'
    assert _read_jsonl(pretty, "json") == [{"items": [{"b": 1}, {"b": 2}]}, {"c": 3}]


def _bomb(codec: str, stamp_bytes: int, good_around: bool = False) -> bytes:
    """A container of ZTF alerts whose middle one carries ``stamp_bytes`` zero bytes: a small
    compressed block that inflates past any small bound (one alert per block)."""
    with open(PACKET, "rb") as f:
        reader = fastavro.reader(f)
        schema, alert = reader.writer_schema, next(reader)
    big = dict(alert, candid=1, cutoutScience=dict(alert["cutoutScience"],
                                                   stampData=bytes(stamp_bytes)))
    alerts = [dict(alert, candid=0), big, dict(alert, candid=2)] if good_around else [big]
    buf = io.BytesIO()
    fastavro.writer(buf, schema, alerts, codec=codec, sync_interval=1)
    return buf.getvalue()


@verdict("decode", "resource bound exceeded")
@pytest.mark.parametrize("codec", CODECS)
def test_a_block_decoding_past_max_decoded_bytes_is_a_decode_error(codec):
    limit = 1024 * 1024
    message = _bomb(codec, 4 * limit)
    if codec != "null":
        assert len(message) < limit // 4  # the bound is on what the block inflates to
    with pytest.raises(DecodeError, match=r"more than MAX_DECODED_BYTES=1048576 bytes; raise"):
        MessageDecoder("avro", max_decoded_bytes=limit).decode(message)
    # Under the bound, the same message decodes.
    [alert] = MessageDecoder("avro", max_decoded_bytes=8 * limit).decode(message)
    assert alert["cutoutScience"]["stampData"] == bytes(4 * limit)


@pytest.mark.parametrize("codec", ["deflate", "xz", "snappy", "zstandard", "lz4"])
def test_the_decoded_size_bound_holds_before_the_block_is_inflated(codec):
    import tracemalloc

    limit, inflated = 1024 * 1024, 64 * 1024 * 1024
    message, decoder = _bomb(codec, inflated), MessageDecoder("avro", max_decoded_bytes=limit)
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="MAX_DECODED_BYTES"):
            decoder.decode(message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The bound, and the decompressor's state (xz: its 8 MiB dictionary), not the block
    assert peak < limit + 12 * 1024 * 1024, f"{peak} bytes allocated to refuse the block"


def test_a_file_block_past_max_decoded_bytes_is_one_reject_and_the_next_blocks_are_read():
    data = _bomb("deflate", 4 * 1024 * 1024, good_around=True)
    items = list(read_records(io.BufferedReader(io.BytesIO(data)), "avro", "in.avro",
                              max_decoded_bytes=1024 * 1024))
    assert [i["candid"] if isinstance(i, dict) else "reject" for i in items] == [0, "reject", 2]
    assert str(items[1]).startswith("in.avro: after record 1, 1 Avro record(s) decode to "
                                    "more than MAX_DECODED_BYTES=1048576 bytes; raise")


def test_corrupt_records_in_a_well_framed_file_block_are_one_reject_and_the_next_blocks_read():
    schema = {"type": "record", "name": "A", "fields": [{"name": "kind", "type": {
        "type": "enum", "name": "K", "symbols": ["a", "b"]}}]}
    buf = io.BytesIO()
    sync = bytes(range(100, 116))  # fixed: a random one could hold the bytes looked for
    fastavro.writer(buf, schema, [{"kind": "a"}, {"kind": "b"}, {"kind": "a"}], sync_interval=1,
                    sync_marker=sync)
    data = bytearray(buf.getvalue())
    # Each block: count 1 (0x02), size 1 (0x02), the enum index, the sync marker. The second
    # record's index (b = 1, zigzag 0x02) becomes 7, past the enum's symbols.
    second = data.index(b"\x02\x02\x02", data.index(sync) + 16) + 2
    data[second] = 0x0E
    items = list(read_records(io.BufferedReader(io.BytesIO(bytes(data))), "avro", "in.avro"))
    assert items[0] == {"kind": "a"} and items[2] == {"kind": "a"}
    assert str(items[1]).startswith("in.avro: after record 1, 1 Avro record(s) of a block are "
                                    "corrupt (IndexError"), str(items[1])


def test_a_block_claiming_more_records_than_bytes_is_a_decode_error_not_a_loop():
    # Records of nulls take no bytes: a damaged count of 10**9 would decode 10**9 of them.
    schema = {"type": "record", "name": "E", "fields": [{"name": "n", "type": "null"}]}
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [{"n": None}])
    good = buf.getvalue()
    sync = good[-16:]
    block = _long(1) + _long(0) + sync
    assert good.endswith(block)
    bad = good[:-len(block)] + _long(10**9) + _long(0) + sync
    assert MessageDecoder("avro").decode(good) == [{"n": None}]
    with pytest.raises(DecodeError, match="a block of 0 bytes cannot hold 1000000000 records"):
        MessageDecoder("avro").decode(bad)
    [reject] = read_records(io.BufferedReader(io.BytesIO(bad)), "avro", "in.avro")
    assert "cannot hold 1000000000 records" in str(reject)


def test_a_scoring_payload_file_reads_as_its_records():
    # The README's records.json, written for `mlflow models predict -i`, used with `run` was
    # one record {"inputs": [...]} and a KeyError reject (#19, finding 2).
    records = [{"objectId": "ZTF1", "mag": 18.1}, {"objectId": "ZTF2", "mag": 19.0}]
    split = {"columns": ["objectId", "mag"], "data": [["ZTF1", 18.1], ["ZTF2", 19.0]]}
    for payload in ({"inputs": records}, {"instances": records},
                    {"dataframe_records": records}, {"dataframe_split": split}):
        pretty = json.dumps(payload, indent=2).encode()
        got = list(formats.read_records(io.BufferedReader(io.BytesIO(pretty)), "json", "r.json"))
        assert got == records, payload
    bad = list(formats.read_records(io.BufferedReader(io.BytesIO(b'{"inputs": [{"a": 1}, 7]}')),
                                    "json", "r.json"))
    assert bad[0] == {"a": 1} and isinstance(bad[1], formats.DecodeError)
    assert "item 1 of the scoring payload" in str(bad[1]) and bad[1].raw_text() == "7"
    # A record that merely has such a key among others is a record; JSON Lines are kept whole.
    other = b'{"inputs": [1], "objectId": "x"}\n'
    assert list(formats.read_records(io.BufferedReader(io.BytesIO(other)), "json", "r")) == [
        json.loads(other)]
    line = b'{"inputs": [{"a": 1}]}\n'
    assert list(formats.read_records(io.BufferedReader(io.BytesIO(line)), "jsonl", "r")) == [
        json.loads(line)]


class _Unseekable(io.RawIOBase):
    """A pipe's stream (``run -`` reads stdin): read only, no seek."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._data.read(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("codec", CODECS)
def test_avro_files_of_every_codec_read_the_same_from_a_pipe(codec):
    data = _container(PACKET, codec, n=2)
    expected = list(fastavro.reader(io.BytesIO(data)))
    read = lambda stream: list(read_records(stream, "avro", "in"))  # noqa: E731
    assert read(io.BufferedReader(io.BytesIO(data))) == expected
    assert read(io.BufferedReader(_Unseekable(data))) == expected
    [bad] = read(io.BytesIO(b"Obj\x02" + data[4:]))
    assert isinstance(bad, DecodeError) and "not an Avro object container file" in str(bad)


def test_files_of_one_schema_share_a_reader_per_declaration_of_fields():
    from mlflow_preproc.runtime.input_fields import parse

    data = PACKET.read_bytes()
    full = next(fastavro.reader(io.BytesIO(data)))
    for paths in (["candidate.magpsf"], ["objectId", "candidate.jd"], ["candidate.magpsf"]):
        [record] = read_records(io.BytesIO(data), "avro", "in", fields=parse(paths))
        assert record == {
            top: {k: full[top][k] for k in sub} if sub else full[top]
            for top, sub in _tree(paths).items()}
    [whole] = read_records(io.BytesIO(data), "avro", "in")
    assert whole == full


def _tree(paths: list[str]) -> dict:
    tree: dict = {}
    for p in paths:
        top, _, rest = p.partition(".")
        tree.setdefault(top, []).extend([rest] if rest else [])
    return tree


# ---- #32 finding 2: no count in the bytes makes a decoder loop or allocate without bound ----

NULLS = {"type": "record", "name": "A", "fields": [
    {"name": "id", "type": "long"}, {"name": "nulls", "type": {"type": "array", "items": "null"}}]}


def _one_block(schema: dict, body: bytes) -> bytes:
    """A one-record container of ``schema`` whose record is ``body``, whatever it says."""
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [])
    header = buf.getvalue()
    sync = header[-16:]
    return header + _long(1) + _long(len(body)) + body + sync


@verdict("decode", "resource bound exceeded")
def test_a_216_byte_message_asking_for_2_62_nulls_is_refused_at_once_not_an_oom():
    # The finding: full decoding grew the process to 2.9 GB; with DROP_FIELDS the skipper
    # looped for minutes. Now the counts are checked first: a decode error naming the bound.
    message = _one_block(NULLS, _long(1) + _long(2**62) + _long(0))
    assert len(message) < 300
    for decoder in (MessageDecoder("avro"), MessageDecoder("avro", skip=["nulls"]),
                    MessageDecoder("avro", skip=["id"])):
        with pytest.raises(DecodeError, match=r"more than 8388608 values \(MAX_DECODED_BYTES"):
            decoder.decode(message)
    schemaless = MessageDecoder("avro", NULLS)
    with pytest.raises(DecodeError, match="MAX_DECODED_BYTES"):
        schemaless.decode(_long(1) + _long(2**62) + _long(0))
    [reject] = read_records(io.BytesIO(message), "avro", "f.avro")
    assert isinstance(reject, DecodeError) and "MAX_DECODED_BYTES" in str(reject)
    # A sane count of the same type decodes, and the bound follows MAX_DECODED_BYTES.
    fine = _one_block(NULLS, _long(1) + _long(1000) + _long(0))
    assert MessageDecoder("avro").decode(fine) == [{"id": 1, "nulls": [None] * 1000}]
    with pytest.raises(DecodeError, match="more than 128 values"):
        MessageDecoder("avro", max_decoded_bytes=1024).decode(fine)


def test_items_of_a_byte_that_decode_to_many_values_are_bounded_too():
    wide = {"type": "record", "name": "W", "fields": [
        {"name": "rows", "type": {"type": "array", "items": {
            "type": "record", "name": "R", "fields": [
                {"name": "x", "type": "int"},
                *({"name": f"n{i}", "type": "null"} for i in range(200))]}}}]}
    # 4,000 one-byte rows of 202 values each: 808,000 values from 4 kB.
    message = _one_block(wide, _long(4000) + b"\x02" * 4000 + _long(0))
    with pytest.raises(DecodeError, match="more than 131072 values"):
        MessageDecoder("avro", max_decoded_bytes=1 << 20).decode(message)
    [record] = MessageDecoder("avro").decode(message)
    assert len(record["rows"]) == 4000 and record["rows"][0]["x"] == 1


def test_real_alert_schemas_are_decoded_without_the_walk():
    from mlflow_preproc.runtime.avro_bounds import amplifies

    for packet in PACKETS:
        with open(packet, "rb") as f:
            schema = fastavro.parse_schema(fastavro.reader(f).writer_schema)
        assert not amplifies(schema, schema["__named_schemas"])
    assert amplifies(fastavro.parse_schema(NULLS), {})


def test_a_header_whose_schema_text_is_over_its_bound_is_refused_before_it_is_read():
    from mlflow_preproc.runtime.avro_bounds import MAX_SCHEMA_TEXT_BYTES

    raw = PACKET.read_bytes()
    # The schema's length prefix says 2^40 bytes: read as asked, a file would hand them over.
    text = fastavro.reader(io.BytesIO(raw)).metadata["avro.schema"].encode()
    at = raw.index(text)
    length = _long(len(text))
    assert raw[at - len(length):at] == length
    damaged = raw[:at - len(length)] + _long(2**40) + raw[at:]
    with pytest.raises(DecodeError, match=f"most {MAX_SCHEMA_TEXT_BYTES} bytes"):
        MessageDecoder("avro").decode(damaged)
    [reject] = read_records(io.BufferedReader(io.BytesIO(damaged)), "avro", "f.avro")
    assert "not an Avro object container file" in str(reject) and "bound" in str(reject)


@pytest.mark.parametrize("extra", [b"\x02", b"\xff", b"\x02\x08abcd"])
def test_a_block_holding_bytes_after_its_records_is_damage(extra):
    # #32 finding 13's message: fastavro reads the record and ignores the rest; polars-avro
    # loops on it. The message decoder calls it what it is.
    schema = {"type": "record", "name": "A", "fields": [{"name": "id", "type": "long"},
                                                        {"name": "s", "type": "string"}]}
    good = _one_block(schema, b"\x02\x08abcd")
    assert MessageDecoder("avro").decode(good) == [{"id": 1, "s": "abcd"}]
    with pytest.raises(DecodeError, match=r"holds \d+ byte\(s\) after its 1 record"):
        MessageDecoder("avro").decode(_one_block(schema, b"\x02\x08abcd" + extra))
