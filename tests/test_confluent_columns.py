"""The column reader on Confluent-framed messages (#36): Rubin alerts of one schema id read in
one call give, record by record, what the message decoder gives; a message it cannot read, or
whose schema it cannot have now, is left to the message decoder, alone (which dead-letters
it, or waits for the registry)."""

from __future__ import annotations

import pytest

from conftest import FakeSchemaRegistry
from mlflow_preproc import config
from mlflow_preproc.runtime.dependencies import Unavailable
from mlflow_preproc.runtime.formats import DecodeError, MessageDecoder, drop_fields
from mlflow_preproc.runtime.input_fields import parse
from rubin_alerts import CUTOUTS, RUBIN_FIELDS, SCHEMA_ID, alerts, framed
from test_avro_columns import same

pytest.importorskip("lsst.alert.packet")
avro_columns = pytest.importorskip("mlflow_preproc.runtime.avro_columns")
if not avro_columns.installed():
    pytest.skip("polars-avro (the columnar extra) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def registry():
    registry = FakeSchemaRegistry()
    for version, schema_id in (("10/0", SCHEMA_ID - 100), ("11/0", SCHEMA_ID)):
        registry.register(schema_id, alerts(0, version)[0])
    yield registry
    registry.close()


def messages(n: int = 12) -> list[bytes]:
    """Rubin alerts of lsst.v10 and lsst.v11 (two schema ids, interleaved)."""
    v10, v11 = alerts(n // 2, "10/0", 64), alerts(n - n // 2, "11/0", 64, seed=7)
    old, new = framed(*v10, SCHEMA_ID - 100), framed(*v11)
    return [m for pair in zip(old, new) for m in pair]


@pytest.mark.parametrize("fields, drop", [
    (RUBIN_FIELDS, ()),
    (RUBIN_FIELDS + ["diaObject.not_in_any_version"], CUTOUTS),
    (["diaSource", "cutoutScience"], ("diaSource.band",)),
], ids=["rubin-contract", "missing-fields-read-as-null", "whole-record-nested-drop"])
def test_rubin_alerts_read_in_one_call_equal_the_message_decoders_record_by_record(
        registry, fields, drop):
    # Before #36 the column reader took only containers: every framed message was None.
    values = messages()
    decoder = MessageDecoder("confluent-avro", registry_url=registry.url, skip=drop,
                             fields=parse(fields))
    reader = avro_columns.ColumnReader(decoder.fields, drop, schema_by_id=decoder.writer_schema)
    got = reader.records(values)
    assert all(records is not None for records in got), "every Rubin alert is read here"
    assert same(got, [[drop_fields(r, drop) for r in decoder.decode(v)] for v in values])


def test_a_damaged_message_or_a_schema_not_had_now_is_left_to_the_message_decoder_alone(
        registry):
    values = messages(6)
    decoder = MessageDecoder("confluent-avro", registry_url=registry.url,
                             fields=parse(RUBIN_FIELDS))
    reader = avro_columns.ColumnReader(decoder.fields, (), schema_by_id=decoder.writer_schema)
    truncated = values[2][:45]  # inside diaSource
    unknown = b"\x00\x00\x00\x03\xe7" + values[3][5:]  # id 999: not in the registry
    got = reader.records([values[0], truncated, values[1], unknown, b"\x00\x00"])
    assert [g is not None for g in got] == [True, False, True, False, False]
    for value in (truncated, unknown):
        with pytest.raises(DecodeError):  # the message decoder's verdict: a dead letter
            decoder.decode(value)
    # a registry that is down: nothing read here, the decoder is the one that waits
    fresh = MessageDecoder("confluent-avro", registry_url=registry.url,
                           fields=parse(RUBIN_FIELDS))
    reader = avro_columns.ColumnReader(fresh.fields, (), schema_by_id=fresh.writer_schema)
    registry.down = True
    try:
        asked = registry.requests
        assert reader.records(values) == [None] * len(values)
        assert registry.requests - asked <= 2 * 2, "a schema id asked for once a batch"
        with pytest.raises(Unavailable):
            fresh.decode(values[0])
    finally:
        registry.down = False
    assert all(r is not None for r in reader.records(values)), "read once it is back"


def test_a_confluent_avro_stream_gets_a_column_reader_with_the_decoders_schemas(registry):
    from mlflow_preproc.streaming.stream import _column_reader

    cfg = config.load("stream", environ={"INPUT_FORMAT": "confluent-avro",
                                         "SCHEMA_REGISTRY_URL": registry.url})
    decoder = MessageDecoder("confluent-avro", registry_url=registry.url,
                             fields=parse(RUBIN_FIELDS))
    reader = _column_reader(cfg, decoder, ())
    assert reader is not None
    values = messages(4)
    assert same(reader.records(values), [decoder.decode(v) for v in values])
    off = config.load("stream", environ={"INPUT_FORMAT": "confluent-avro", "AVRO_COLUMNS":
                                         "false", "SCHEMA_REGISTRY_URL": registry.url})
    assert _column_reader(off, decoder, ()) is None
