"""The rate limit on librdkafka's log lines (fast, with a clock of the test's own)."""

from __future__ import annotations

import logging

from mlflow_preproc.streaming.client_logs import RateLimit


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
