"""What a dead letter says of itself, and which ones a replay takes: the pure rules, fast.
test_dead_letters.py runs the commands on a real stream's dead-letter topic."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mlflow_preproc.streaming.dead_letters import DeadLetter, Selection
from verdict_cells import verdict


def letter(headers, partition=0, offset=7, timestamp_ms=1000) -> DeadLetter:
    return DeadLetter(partition, offset, timestamp_ms, b"k", b"v", headers)


STREAM_HEADERS = [("x-preproc-error", b"record 0: pre_processing raised KeyError: 'x'"),
                  ("x-preproc-error-type", b"KeyError"), ("x-preproc-stage", b"preprocess"),
                  ("x-preproc-source", b"raw.v1/2/41"), ("x-preproc-model", b"models:/p/1")]


def test_a_dead_letter_names_its_stage_error_and_source_and_keeps_the_inputs_headers():
    replayed_before = [("trace", b"t1"), ("x-preproc-replay-of", b"raw-dlq/0/3"),
                       ("x-preproc-error", b"an upstream header of that name")]
    d = letter([*replayed_before, *STREAM_HEADERS])
    assert (d.stage, d.error_type, d.source) == ("preprocess", "KeyError", ("raw.v1", 2, 41))
    assert d.original_headers() == replayed_before  # up to the stream's own, the last ones
    assert letter([("trace", b"t")]).original_headers() == [("trace", b"t")]


@given(st.lists(st.tuples(st.sampled_from(["x-preproc-error", "x-preproc-source",
                                           "x-preproc-stage", "trace"]),
                          st.binary(max_size=40)), max_size=8))
def test_any_headers_read_as_a_dead_letter_without_crashing(headers):
    d = letter(headers)
    assert isinstance(d.stage, str) and isinstance(d.error, str)
    assert d.source is None or (d.source[1] >= 0 and d.source[2] >= 0)
    assert d.original_headers() == headers[:len(d.original_headers())]


def test_a_selection_takes_what_every_given_filter_takes():
    d = letter(STREAM_HEADERS, partition=1, offset=120, timestamp_ms=5000)
    assert Selection()(d)
    assert Selection(stages={"preprocess", "decode"}, error_types={"KeyError"})(d)
    assert not Selection(stages={"decode"})(d)
    assert Selection(offsets={1: [(100, 250)]})(d)
    assert not Selection(offsets={0: [(100, 250)]})(d)
    assert not Selection(offsets={1: [(121, 250)]})(d)
    assert Selection(offsets={1: [(0, 5), (120, 120)]})(d)
    assert Selection(since_ms=5000, until_ms=5000)(d) and not Selection(since_ms=5001)(d)


def test_times_and_offset_ranges_read_as_an_operator_writes_them():
    from mlflow_preproc.cli import _parser

    args = _parser().parse_args(["dlq", "replay", "raw-dlq", "--since", "2026-12-03T09:00:00Z",
                                 "--until", "2026-12-03T10:00:00", "--offsets", "0:1-2",
                                 "--offsets", "0:5-6"])
    assert args.since == 1796288400000 and args.until == args.since + 3600_000
    assert args.offsets == [(0, (1, 2)), (0, (5, 6))]


@verdict("replay", "dependency down")
@verdict("replay", "dependency slow")
def test_a_dependency_that_does_not_answer_stops_a_replay_through_a_model(tracking_uri):
    """A schema registry that is down is the environment's fault: the replay stops with the
    reason, and no dead letter is judged failed (the stream would wait instead)."""
    import socket

    import mlflow
    import pytest

    from mlflow_preproc import config
    from mlflow_preproc.streaming.dead_letters import DeadLetterError
    from mlflow_preproc.streaming.reprocess import Reprocessor

    with mlflow.start_run():
        model = mlflow.preproc.log_model(lambda r: {"id": r["id"]}, name="p",
                                         pip_requirements=[]).model_uri
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg = config.load("replay", environ={"INPUT_FORMAT": "confluent-avro",
                                         "SCHEMA_REGISTRY_URL": f"http://127.0.0.1:{closed}",
                                         "OUTPUT_TOPIC": "clean"})
    through = Reprocessor.load(cfg, model, "raw-dlq")
    confluent = DeadLetter(0, 7, 1000, b"k", b"\x00\x00\x00\x00\x05\x02", STREAM_HEADERS)
    with pytest.raises(DeadLetterError, match="unavailable.*the replay stopped"):
        through.run_through([confluent])
    # a record it can judge is judged: its outputs, or the stage it fails at again
    json_cfg = config.load("replay", environ={"OUTPUT_TOPIC": "clean"})
    through = Reprocessor.load(json_cfg, model, "raw-dlq")
    good, bad = (DeadLetter(0, 8, 1000, b"k", b'{"id": 1}', STREAM_HEADERS),
                 DeadLetter(0, 9, 1000, b"k", b'{"x": 1}', STREAM_HEADERS))
    ok, failed = through.run_through([good, bad])
    assert [v for v, _ in ok.outputs] == [b'{"id":1}'] and ok.failure is None
    assert ("x-preproc-source", b"raw.v1/2/41") in ok.outputs[0][1]
    assert failed.outputs == [] and failed.failure[:2] == ("preprocess", "KeyError")
