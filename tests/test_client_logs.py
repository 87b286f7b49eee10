"""The rate limit on librdkafka's log lines (fast, with a clock of the test's own), and the
commands that read Kafka when no broker answers."""

from __future__ import annotations

import logging
import subprocess

import pytest

from conftest import BIN, free_port
from mlflow_preproc.streaming.client_logs import OtherClientsProperty, RateLimit


def record(message: str, **extra) -> logging.LogRecord:
    r = logging.LogRecord("mlflow_preproc.librdkafka", logging.ERROR, __file__, 1, message,
                          (), None)
    r.__dict__.update(extra)
    return r


def test_one_line_of_a_kind_per_interval_then_a_count_of_what_was_held_back():
    now = [0.0]
    limit = RateLimit(30, clock=lambda: now[0])
    fail = "FAIL [rdkafka#consumer-1]: Connect to ipv4#127.0.0.1:{} failed (after {}ms)"
    passed = []
    for second in range(0, 61):
        now[0] = float(second)
        r = record(fail.format(9092, second))  # the numbers change, the kind does not
        if limit.filter(r):
            passed.append(r.getMessage())
    assert len(passed) == 3  # at 0 s, 30 s and 60 s
    assert passed[1].endswith("(29 similar lines held back in the last 30 s)")
    other = record("REQTMOUT [rdkafka#producer-1]: Timed out ProduceRequest")
    assert limit.filter(other)  # another kind passes at once


def test_the_error_field_makes_a_kind_of_its_own():
    limit = RateLimit(30, clock=lambda: 0.0)
    assert limit.filter(record("kafka client error", error="Local: Broker transport failure"))
    assert limit.filter(record("kafka client error", error="Local: Authentication failure"))
    assert not limit.filter(record("kafka client error", error="Local: Authentication failure"))



def test_a_consumer_property_the_producer_ignores_is_no_warning():
    """LIBRDKAFKA_SESSION_TIMEOUT_MS (the quickstart's) reaches the producer too (#37)."""
    ignored = record("CONFWARN [rdkafka#producer-2] [thrd:app]: Configuration property "
                     "session.timeout.ms is a consumer property and will be ignored by this "
                     "producer instance")
    assert not OtherClientsProperty().filter(ignored)
    assert OtherClientsProperty().filter(record("CONFWARN [rdkafka#consumer-1] [thrd:app]: "
                                                "Configuration property foo is unknown"))


@pytest.mark.slow
def test_the_commands_that_read_kafka_say_no_broker_answers_in_one_line_not_hundreds():
    """dlq and status with nothing listening: librdkafka's lines rate-limited as the stream's
    are (there were 194 raw %3|...|FAIL lines in 14 s), then one line naming a flag that
    exists and the local broker (#37)."""
    nothing_listens = f"127.0.0.1:{free_port()}"
    commands = {"dlq": [["dlq", "inspect", "raw-dlq"], ["dlq", "replay", "raw-dlq"]],
                "status": [["status", "--group", "g", "--topic", "raw"]]}
    running = [(name, subprocess.Popen(
        [str(BIN / "mlflow-preproc"), *argv, "--kafka-bootstrap-servers", nothing_listens],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for name, argvs in commands.items() for argv in argvs]  # at once: ~15 s in all
    for name, proc in running:
        err = proc.communicate(timeout=120)[1]
        lines, tail = err.splitlines(), err[-1500:]
        assert proc.returncode == 2, tail
        assert not [line for line in lines if line.startswith("%")], tail
        assert len(lines) <= 3, tail
        assert lines[-1].startswith(f"mlflow-preproc {name}: error: ") and (
            f"cannot reach Kafka at {nothing_listens} (") in lines[-1], tail
        assert ("check KAFKA_BOOTSTRAP_SERVERS (--kafka-bootstrap-servers) and that the broker "
                f"is up; to try things on this machine, mlflow-preproc broker --port "
                f"{nothing_listens.rpartition(':')[2]} runs one there") in lines[-1], tail
