"""Which failures are verdicts on a record (dead letters) and which are the environment's
(waited for, or a stop): the pure rules, fast. test_faults.py shows them end to end."""

from __future__ import annotations

import pytest

from mlflow_preproc.streaming.bridge import Answer, judge
from verdict_cells import verdict


@pytest.mark.parametrize("status, answer", [
    (200, Answer.PREDICTED),
    # only these judge the records themselves
    (400, Answer.REFUSED_INPUT), (413, Answer.REFUSED_INPUT), (422, Answer.REFUSED_INPUT),
    # the server's state: wait and retry
    (408, Answer.UNAVAILABLE), (425, Answer.UNAVAILABLE), (429, Answer.UNAVAILABLE),
    (503, Answer.UNAVAILABLE),
    # the records' or the server's: asked again, halved, the canary asked (#32 finding 3)
    (500, Answer.FAILED), (502, Answer.FAILED), (504, Answer.FAILED), (599, Answer.FAILED),
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


@verdict("schema registry in", "dependency slow")
@verdict("schema registry in", "not its protocol")
@verdict("schema registry out", "dependency slow")
@verdict("schema registry out", "not its protocol")
def test_a_slow_registry_or_one_answering_no_registry_answer_is_unavailable(schema_registry):
    # #32's table: schema registry in and out, dependency slow and an answer not of its
    # protocol (a proxy's page with 200): waited for, never a record's dead letter
    from mlflow_preproc.runtime.dependencies import Unavailable
    from mlflow_preproc.runtime.formats import MessageDecoder, MessageEncoder

    schema_registry.register(3, OBS)
    fast = {"timeout": 1}
    decoder = MessageDecoder("confluent-avro", registry_url=schema_registry.url,
                             registry_config=fast)
    encoder = MessageEncoder("confluent-avro", OBS, schema_registry.url, fast, topic="out")
    schema_registry.delay = 2.5
    with pytest.raises(Unavailable, match="schema registry unavailable: .*Timeout"):
        decoder.decode(framed(3, {"id": 1}, OBS))
    with pytest.raises(Unavailable, match="Timeout"):
        encoder.prepare()
    schema_registry.delay, schema_registry.garbage = 0.0, True
    with pytest.raises(Unavailable, match="schema registry unavailable"):
        decoder.decode(framed(3, {"id": 1}, OBS))
    with pytest.raises(Unavailable):
        encoder.prepare()
    schema_registry.garbage = False
    assert decoder.decode(framed(3, {"id": 1}, OBS)) == [{"id": 1}]
    encoder.prepare()
    assert encoder.encode({"id": 1})[:1] == b"\x00"


@verdict("schema registry out", "auth/ACL refused")
@pytest.mark.parametrize("status, code", [(401, 40101), (403, 40301), (409, 409)])
def test_a_registry_refusing_the_output_schema_or_this_client_is_misconfigured(
        schema_registry, status, code):
    from mlflow_preproc.runtime.dependencies import Misconfigured
    from mlflow_preproc.runtime.formats import MessageEncoder

    schema_registry.refuse = (status, code)
    encoder = MessageEncoder("confluent-avro", OBS, schema_registry.url, topic="out")
    with pytest.raises(Misconfigured, match=f"HTTP {status}"):
        encoder.prepare()


@verdict("schema registry in", "missing library or codec")
@verdict("schema registry out", "missing library or codec")
def test_a_registry_client_library_missing_is_refused_at_start():
    import subprocess
    import sys

    script = """
import sys
sys.modules["authlib"] = None  # confluent-kafka's schemaregistry extra, not installed
from mlflow_preproc.runtime.formats import MessageDecoder, MessageEncoder
OBS = {"type": "record", "name": "Obs", "fields": [{"name": "id", "type": "long"}]}
for make in (lambda: MessageDecoder("confluent-avro", registry_url="http://r:8081"),
             lambda: MessageEncoder("confluent-avro", OBS, "http://r:8081", topic="t")):
    try:
        make()
    except ValueError as exc:
        assert "schemaregistry extra" in str(exc), exc
    else:
        raise AssertionError("made without the library")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("status, code, kind", [
    (404, 40403, "DecodeError"),  # schema not found: the record names an id nobody has
    (401, 40101, "Misconfigured"), (403, 40301, "Misconfigured"),
    (404, -1, "Misconfigured"),  # not the registry's own 404: a wrong SCHEMA_REGISTRY_URL
    (500, 50001, "Unavailable"), (503, 50003, "Unavailable"), (429, -1, "Unavailable"),
    (408, -1, "Unavailable"),
])
@verdict("schema registry in", "auth/ACL refused")
def test_registry_answers_are_sorted_by_whose_fault_they_are(status, code, kind):
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    from mlflow_preproc.runtime.formats import _registry_failure

    failure = _registry_failure(SchemaRegistryError(status, code, "msg"), "schema id 1",
                                "http://registry:8081")
    assert type(failure).__name__ == kind


# ---- the dead-letter brake and /healthz -----------------------------------------------------

def test_the_brake_engages_once_most_of_a_full_window_is_dead_lettered():
    from mlflow_preproc.streaming.brake import DeadLetterBrake

    brake = DeadLetterBrake(ratio=0.5, window=200)
    assert brake.observe(100, 100) is None  # the window is not full yet
    assert brake.observe(100, 0) is None  # 100 of 200: not more than half
    assert brake.observe(100, 100) is None  # the last 200 records: 100 failed
    assert brake.observe(100, 100).startswith("200 of the last 200 records went to the dead")
    brake = DeadLetterBrake(ratio=0.5, window=200)
    for _ in range(20):  # a steady trickle of poison is what dead letters are for
        assert brake.observe(100, 5) is None
    assert "DLQ_BRAKE_RATIO=0.5" in brake.observe(300, 290)


def test_a_brake_ratio_of_one_never_engages():
    from mlflow_preproc.streaming.brake import DeadLetterBrake

    brake = DeadLetterBrake(ratio=1.0, window=10)
    assert all(brake.observe(50, 50) is None for _ in range(5))


def test_healthz_fails_for_a_consumer_with_lag_that_fetches_nothing():
    # The stall of #18.1: alive (the loop spins on empty polls), assigned, lagging, paused.
    from mlflow_preproc.streaming.metrics import LoopStats

    stats = LoopStats("stream")
    stats.assigned([("in", 0)], {("in", 0)})
    stats.on_librdkafka_stats('{"topics": {"in": {"partitions": {"0": {"consumer_lag": 1200}'
                              ', "-1": {"consumer_lag": 5}}}}}')
    now = stats.last_fetch + 150
    stats.last_progress = now  # empty polls keep the loop itself alive
    ok, reason = stats.health(now, stall_s=120)
    assert not ok and "1200 records wait on partitions [0]" in reason
    stats.waiting_for = "model server"  # a dependency down: restarting would not help
    stats.waiting_why = "HTTP 503: the model is reloading"
    assert stats.health(now, stall_s=120) == (
        True, "waiting for the model server: HTTP 503: the model is reloading")
    stats.waiting_for = None
    stats.lag = {("in", 0): 0}  # caught up: nothing to fetch is fine
    assert stats.health(now, stall_s=120) == (True, "ok")
    stats.brake = "300 of the last 300 records..."
    assert stats.health(now, stall_s=120)[0] is False


def test_a_rollout_gets_its_verdict_once_the_version_caught_up_or_handled_a_window():
    from mlflow_preproc.streaming.metrics import LoopStats

    stats = LoopStats("stream", verdict_after=200)
    assert not stats.settled()  # joined, about to fetch a backlog
    stats.handled = 199
    assert not stats.settled()
    stats.handled = 200  # the brake has judged a full window
    assert stats.settled()
    stats.handled, stats.caught_up = 0, True  # nothing (more) to read
    assert stats.settled()
    stats.caught_up, stats.waiting_for = False, "model server"  # no verdict can come yet
    assert stats.settled()
