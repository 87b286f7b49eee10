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
