"""Which failures are verdicts on a record (dead letters) and which are the environment's
(waited for, or a stop): the pure rules, fast. test_faults.py shows them end to end."""

from __future__ import annotations

import pytest

from mlflow_preproc.streaming.bridge import Answer, judge


@pytest.mark.parametrize("status, answer", [
    (200, Answer.PREDICTED),
    # only these judge the records themselves
    (400, Answer.REFUSED_INPUT), (413, Answer.REFUSED_INPUT), (422, Answer.REFUSED_INPUT),
    # the server's state: wait and retry
    (408, Answer.UNAVAILABLE), (425, Answer.UNAVAILABLE), (429, Answer.UNAVAILABLE),
    (500, Answer.UNAVAILABLE), (502, Answer.UNAVAILABLE), (503, Answer.UNAVAILABLE),
    (504, Answer.UNAVAILABLE),
    # the bridge's configuration: stop, commit nothing
    (401, Answer.MISCONFIGURED), (403, Answer.MISCONFIGURED), (404, Answer.MISCONFIGURED),
    (405, Answer.MISCONFIGURED), (415, Answer.MISCONFIGURED),
])
def test_model_server_answers_are_sorted_by_what_they_judge(status, answer):
    assert judge(status) is answer


def framed(schema_id: int, record: dict, schema: dict) -> bytes:
    import io
    import struct

    import fastavro

    buf = io.BytesIO(struct.pack(">bI", 0, schema_id))
    buf.seek(5)
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


OBS = {"type": "record", "name": "Obs", "fields": [{"name": "id", "type": "long"}]}


def test_a_registry_that_is_down_is_unavailable_and_an_unknown_id_is_the_records_fault(
        schema_registry):
    from mlflow_preproc.runtime.dependencies import Unavailable
    from mlflow_preproc.runtime.formats import DecodeError, MessageDecoder

    schema_registry.register(3, OBS)
    decoder = MessageDecoder("confluent-avro", registry_url=schema_registry.url)
    schema_registry.down = True
    with pytest.raises(Unavailable, match="schema registry unavailable: .*HTTP 503"):
        decoder.decode(framed(3, {"id": 1}, OBS))
    schema_registry.down = False
    assert decoder.decode(framed(3, {"id": 1}, OBS)) == [{"id": 1}]  # nothing cached amiss
    with pytest.raises(DecodeError, match="schema id 4 not found in the registry"):
        decoder.decode(framed(4, {"id": 1}, OBS))


def test_a_registry_nobody_listens_on_is_unavailable():
    from conftest import free_port

    from mlflow_preproc.runtime.dependencies import Unavailable
    from mlflow_preproc.runtime.formats import MessageDecoder

    decoder = MessageDecoder("confluent-avro", registry_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Unavailable, match="ConnectError"):
        decoder.decode(framed(3, {"id": 1}, OBS))


@pytest.mark.parametrize("status, code, kind", [
    (404, 40403, "DecodeError"),  # schema not found: the record names an id nobody has
    (401, 40101, "Misconfigured"), (403, 40301, "Misconfigured"),
    (404, -1, "Misconfigured"),  # not the registry's own 404: a wrong SCHEMA_REGISTRY_URL
    (500, 50001, "Unavailable"), (503, 50003, "Unavailable"), (429, -1, "Unavailable"),
    (408, -1, "Unavailable"),
])
def test_registry_answers_are_sorted_by_whose_fault_they_are(status, code, kind):
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from mlflow_preproc.runtime.formats import _registry_failure

    failure = _registry_failure(SchemaRegistryError(status, code, "msg"), "schema id 1",
                                "http://registry:8081")
    assert type(failure).__name__ == kind
