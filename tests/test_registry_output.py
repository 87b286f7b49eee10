"""confluent-avro output: the output schema is registered when the stream first needs it, and
a registry that is down then is waited for, as on the input side (#32 finding 8)."""

from __future__ import annotations

import io
import json
import struct
import time

import fastavro
import mlflow
import pytest

from conftest import consume, produce, stream_env, unique
from verdict_cells import verdict

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

OUT = {"type": "record", "name": "Out", "fields": [{"name": "id", "type": "long"},
                                                   {"name": "double", "type": "long"}]}


def doubled(record):
    return {"id": record["id"], "double": record["id"] * 2}


@verdict("schema registry out", "dependency down")
@verdict("schema registry out", "signal")
def test_a_registry_down_at_start_up_is_waited_for_then_outputs_carry_the_registered_id(
        tracking_uri, broker, streams, schema_registry):
    # The finding: exit 2 after 9 s (ConnectError) when the registry was down at start,
    # while the input side waits for it as documented.
    with mlflow.start_run():
        uri = mlflow.preproc.log_model(doubled, name="p", output_avro_schema=OUT,
                                       pip_requirements=[]).model_uri
    topic = unique("raw")
    broker.create_topics(topic)
    schema_registry.down = True
    env = stream_env(broker.bootstrap_servers, uri, topic, OUTPUT_TOPIC=unique("out"),
                     OUTPUT_FORMAT="confluent-avro", SCHEMA_REGISTRY_URL=schema_registry.url)
    stream = streams(env)
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i}).encode() for i in range(5)])
    deadline = time.monotonic() + 60
    while not stream.events("dependency_unavailable"):
        assert stream.proc.poll() is None, stream.text()[-2000:]
        assert time.monotonic() < deadline, stream.text()[-2000:]
        time.sleep(0.2)
    assert "schema registry" in stream.events("dependency_unavailable")[0]["dependency"]
    schema_registry.down = False
    outputs = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 5)
    assert stream.stop() == 0, stream.text()[-2000:]
    [(subject, _)] = schema_registry.by_subject
    assert subject == f"{env['OUTPUT_TOPIC']}-value"
    decoded = []
    for message in outputs:
        magic, schema_id = struct.unpack(">bI", message.value()[:5])
        assert (magic, schema_id) == (0, schema_registry.by_subject[(subject, 1)])
        decoded.append(fastavro.schemaless_reader(io.BytesIO(message.value()[5:]),
                                                  fastavro.parse_schema(OUT), None))
    assert sorted(r["id"] for r in decoded) == list(range(5))
    assert all(r["double"] == 2 * r["id"] for r in decoded)
