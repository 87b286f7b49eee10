"""Record formats and the JSON rules, on real ZTF alert packets (fast, no servers)."""

from __future__ import annotations

import base64
import io
import json
import struct

import fastavro
import pytest

from conftest import DATA
from mlflow_preproc.runtime.avro_schemas import SchemaError, load_avro_schema
from mlflow_preproc.runtime.formats import (
    ZTF_CUTOUTS,
    DecodeError,
    EncodeError,
    FileWriter,
    MessageDecoder,
    MessageEncoder,
    drop_fields,
    read_records,
)

PACKET = DATA / "472263571115115000.avro"


def test_avro_container_message_decodes_like_the_file():
    raw = PACKET.read_bytes()
    [alert] = MessageDecoder("avro").decode(raw)
    with open(PACKET, "rb") as f:
        assert alert == next(fastavro.reader(f))
    assert alert["objectId"].startswith("ZTF")


@pytest.mark.parametrize("codec", ["null", "deflate", "bzip2"])
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
