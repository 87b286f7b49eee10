"""What the stream's log says to the person or program reading it: dead letters summed up, not
one line each; text on a terminal, JSON on a pipe. Fast: the rules, on real logging and a
real pseudo-terminal. test_stream.py checks the same lines from a running stream."""

from __future__ import annotations

import json
import logging
import os

import pytest
from prometheus_client import generate_latest

from mlflow_preproc.streaming.metrics import DEAD_LETTERS_IN_FULL, LoopStats, configure_logging


@pytest.fixture
def preproc_log(caplog):
    # configure_logging stops propagation to the root logger, where caplog listens.
    logger = logging.getLogger("mlflow_preproc")
    propagate, logger.propagate = logger.propagate, True
    caplog.set_level(logging.INFO, "mlflow_preproc")
    yield caplog
    logger.propagate = propagate


def test_dead_letters_are_logged_in_full_a_few_per_interval_then_counted(preproc_log):
    stats = LoopStats("stream")
    kinds = [("decode", "DecodeError")] * 2000 + [("preprocess", "KeyError")] * 8
    in_full = [stats.dead_letter(stage, kind) for stage, kind in kinds]
    assert in_full == [True] * DEAD_LETTERS_IN_FULL + [False] * (2008 - DEAD_LETTERS_IN_FULL)
    assert stats.counts["failed"] == 2008

    stats.maybe_log(interval=0)
    [summary] = [r for r in preproc_log.records if getattr(r, "event", "") == "dead_letters"]
    assert summary.levelname == "WARNING" and summary.dead_letters == 2008
    assert summary.by_stage_and_type == {"decode/DecodeError": 2000, "preprocess/KeyError": 8}
    assert "2008 records sent to the dead-letter topic" in summary.getMessage()
    assert "(decode/DecodeError 2000, preprocess/KeyError 8)" in summary.getMessage()

    # A new interval: its first dead letters are shown in full again, and nothing is left
    # to sum up until there are some.
    assert stats.dead_letter("encode", "ValueError") is True
    preproc_log.clear()
    stats.maybe_log(interval=0)
    stats.maybe_log(interval=0)
    assert [r.by_stage_and_type for r in preproc_log.records
            if getattr(r, "event", "") == "dead_letters"] == [{"encode/ValueError": 1}]
    # Operators get the same split from /metrics.
    metrics = generate_latest(stats.registry).decode()
    assert ('mlflow_preproc_dead_letters_total{command="stream",error_type="DecodeError",'
            'stage="decode"} 2000.0') in metrics


def _log_through(fd_write: int, fmt: str) -> None:
    with os.fdopen(os.dup(fd_write), "w") as stream:
        configure_logging(fmt, "INFO", stream)
        logging.getLogger("mlflow_preproc").info("partitions assigned",
                                                 extra={"event": "assign", "partitions": [0]})
        stream.flush()


@pytest.mark.parametrize("terminal", [True, False])
def test_log_format_auto_is_text_on_a_terminal_and_json_otherwise(terminal):
    read_fd, write_fd = os.openpty() if terminal else os.pipe()
    try:
        _log_through(write_fd, "auto")
        line = os.read(read_fd, 65536).decode().strip()
    finally:
        os.close(read_fd)
        os.close(write_fd)
        configure_logging("json", "INFO")
    if terminal:
        assert " INFO partitions assigned event=assign partitions=[0]" in line
    else:
        entry = json.loads(line)
        assert (entry["message"], entry["level"], entry["partitions"]) == (
            "partitions assigned", "INFO", [0])
