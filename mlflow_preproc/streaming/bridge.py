"""Model bridge: feed a preprocessed topic to a model server, produce its predictions.

    message in -> decode (JSON) -> POST {API_URL}{API_ENDPOINT} in batches -> prediction out

Named records go as ``dataframe_split`` (their keys are the columns), feature vectors as
``instances`` (``PAYLOAD_FORMAT`` picks another of MLflow's scoring formats, e.g. ``inputs``
for a tensor signature).

Each prediction is produced keyed like its input. What the server answers decides what
happens to the records (:func:`judge`):

- 400, 413, 422 judge the input: a refused batch is retried record by record, and the records
  the model refuses go to the dead-letter topic with the server's message;
- a server that does not answer (connection refused), or answers 408, 425, 429 or 503 (busy,
  rate limited, reloading) is waited for, with backoff (``Retry-After`` honoured), input
  paused and nothing committed;
- an answer that may be the record's or the server's (500, 502, 504, no answer within
  ``REQUEST_TIMEOUT_S``, a 200 that is not one prediction per record) is sorted out by
  asking again: the batch is halved while the server still predicts a record it predicted
  before (the canary; before the first, a record of the batch picked at random), so one
  record that makes the model fail or hang stands alone; a record
  the server fails ``RECORD_ATTEMPTS`` times alone while it answers others goes to the
  dead-letter topic (stage ``predict``); a server that fails the canary too is waited for;
- any other 4xx (401, 403, 404...) says the bridge is misconfigured: it stops (exit 2) with
  nothing committed, rather than dead-letter a whole topic.

Delivery, commits and shutdown are :class:`KafkaLoop`'s.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from enum import Enum
from typing import Any

import requests
from confluent_kafka import Message

from mlflow_preproc.config import Config, ConfigError, sanitize_topic
from mlflow_preproc.runtime.dependencies import Misconfigured, Unavailable
from mlflow_preproc.runtime.formats import MessageDecoder
from mlflow_preproc.runtime.jsonable import dumps
from mlflow_preproc.runtime.model_input import payload, per_record
from mlflow_preproc.secrets import redact_url
from mlflow_preproc.streaming.loop import KafkaLoop
from mlflow_preproc.streaming.shutdown import Shutdown

class ModelRejected(Exception):
    """The model server refused the input (HTTP 400/413/422); the message is the server's."""


class ServerFailed(Exception):
    """The model server failed a request in a way that may be the records' or its own (500,
    502, 504, a timeout, an answer that is not one prediction per record)."""

    def __init__(self, problem: str, retry_after: float = 0.0):
        super().__init__(problem)
        self.problem = problem
        self.retry_after = retry_after


class Answer(Enum):
    """What an HTTP status of the model server says."""

    PREDICTED = "predicted"
    REFUSED_INPUT = "refused the input"  # a verdict on the records: dead letters
    UNAVAILABLE = "unavailable"  # the server's state, not the records': wait and retry
    FAILED = "failed"  # the records' or the server's: asked again to tell which
    MISCONFIGURED = "misconfigured"  # wrong URL, endpoint or credentials: stop


_REFUSED_INPUT = {400, 413, 422}
_UNAVAILABLE = {408, 425, 429, 503}


def judge(status: int) -> Answer:
    """Sort a model server's HTTP status: only answers about the input may dead-letter."""
    if status < 400:
        return Answer.PREDICTED
    if status in _REFUSED_INPUT:
        return Answer.REFUSED_INPUT
    if status in _UNAVAILABLE:
        return Answer.UNAVAILABLE
    if status >= 500:
        return Answer.FAILED
    return Answer.MISCONFIGURED


class Bridge(KafkaLoop):
    """Calls an MLflow scoring server for every record of a topic, at least once."""

    command = "bridge"

    def __init__(self, config: Config, shutdown: Shutdown | None = None):
        output_topic = config.require("OUTPUT_TOPIC")
        # One group per output: two bridges feeding different models each see every record.
        group = config["CONSUMER_GROUP_ID"] or sanitize_topic(f"mlflow-preproc-bridge-"
                                                              f"{output_topic}")
        super().__init__(config, config.require("INPUT_TOPIC"), output_topic,
                         config["DLQ_TOPIC"], group, shutdown=shutdown)
        self.url = config.require("API_URL").rstrip("/") + config["API_ENDPOINT"]
        self.shown_url = redact_url(self.url)  # what logs and errors may say
        self.timeout = config["REQUEST_TIMEOUT_S"]
        self.payload_format = config["PAYLOAD_FORMAT"]
        self.attempts = config["RECORD_ATTEMPTS"]
        self.decoder = MessageDecoder(config["INPUT_FORMAT"], any_json=True,
                                      max_decoded_bytes=config["MAX_DECODED_BYTES"])
        self.session = requests.Session()
        self.canary: Any = None  # the last record the server predicted
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"API_URL={redact_url(config['API_URL'])!r} is not an http(s) "
                              "URL; e.g. API_URL=http://127.0.0.1:8080")

    @classmethod
    def from_config(cls, config: Config, shutdown: Shutdown | None = None) -> Bridge:
        return cls(config, shutdown)

    def handle_batch(self, messages: Sequence[Message]) -> None:
        records, owners = self.decode(messages, self.decoder)
        if not records:
            return
        # A server that is down or failing everything is waited for (input paused, the
        # consumer polled so the group keeps us); a shutdown meanwhile leaves the batch
        # uncommitted. What was predicted before a wait is kept, not asked again.
        batch = _Batch(records)
        self.when_available(self._predict, batch)
        for msg, prediction in zip(owners, batch.results):
            if isinstance(prediction, (ModelRejected, ServerFailed)):
                self.dead_letter(msg, "predict", prediction)
                continue
            self.produce(msg, [dumps(prediction)])

    def _predict(self, batch: _Batch) -> None:
        """Predict the spans of ``batch`` still to do, halving those the server fails while
        it predicts others; raises Unavailable while it predicts nothing."""
        while batch.spans:
            start, end = batch.spans[0]
            verified = False  # the server predicted another record just before this request
            if batch.suspect:
                if not self._server_answers(batch.records[start:end]):
                    raise Unavailable("model server", batch.failure.problem,
                                      batch.failure.retry_after)
                verified, batch.suspect = True, False
            try:
                batch.results[start:end] = self._post(batch.records[start:end])
                self.canary = batch.records[start]
                batch.spans.pop(0)
            except ModelRejected as exc:
                # refused: record by record, so only the refused ones are dead letters
                batch.spans.pop(0)
                if end - start == 1:
                    batch.results[start] = exc
                else:
                    batch.spans[:0] = [(i, i + 1) for i in range(start, end)]
            except ServerFailed as exc:
                # The records' fault or the server's? Asked again, each time after the
                # server has predicted another record (a server wedged by the last request
                # is waited for first).
                batch.failure, batch.suspect = exc, True
                if end - start > 1:
                    middle = (start + end) // 2
                    batch.spans[:1] = [(start, middle), (middle, end)]
                elif verified or self._server_answers(batch.records[start:end]):
                    batch.strikes[start] += 1
                    if batch.strikes[start] >= self.attempts:
                        batch.results[start] = ServerFailed(
                            f"the model server failed this record {batch.strikes[start]} "
                            f"times while it answered other records ({exc.problem})")
                        batch.spans.pop(0)
                        batch.suspect = False

    def _server_answers(self, candidates: list[Any]) -> bool:
        """Whether the server predicts the last record it predicted, i.e. is up and serving
        the model now. Before any record was predicted, one of ``candidates`` picked at
        random is asked instead: a batch whose records all fail alone cannot be told from a
        server failing everything, and is waited for."""
        canary = self.canary if self.canary is not None else random.choice(candidates)
        try:
            self._post([canary])
        except (ServerFailed, Unavailable, ModelRejected):
            return False
        self.canary = canary
        return True

    def _post(self, records: list[Any]) -> list[Any]:
        body = dumps(payload(records, self.payload_format))
        try:
            resp = self.session.post(self.url, data=body, timeout=self.timeout,
                                     headers={"Content-Type": "application/json"})
        except requests.Timeout as exc:
            # It took the request and did not answer in time: maybe a record makes it hang
            if isinstance(exc, requests.ConnectTimeout):
                raise Unavailable("model server", _failure(exc, self.url)) from None
            raise ServerFailed(f"no answer within REQUEST_TIMEOUT_S={self.timeout:g} s") \
                from None
        except requests.RequestException as exc:
            raise Unavailable("model server", _failure(exc, self.url)) from None
        answer = judge(resp.status_code)
        if answer is Answer.PREDICTED:
            return self._predictions(resp, len(records))
        if answer is Answer.REFUSED_INPUT:
            raise ModelRejected(f"the model server refused the input with HTTP "
                                f"{resp.status_code}: {_message(resp)}")
        if answer is Answer.MISCONFIGURED:
            raise Misconfigured(_misconfigured(self.shown_url, resp))
        problem = f"HTTP {resp.status_code}: {_message(resp)}"
        if answer is Answer.UNAVAILABLE:
            raise Unavailable("model server", problem, _retry_after(resp))
        raise ServerFailed(problem, _retry_after(resp))

    @staticmethod
    def _predictions(resp: requests.Response, expected: int) -> list[Any]:
        # A 200 that is not a prediction (a proxy's maintenance page, another service at
        # API_URL) says nothing about the records: it fails like a 5xx.
        try:
            predictions = resp.json()["predictions"]
        except (ValueError, KeyError, TypeError):
            raise ServerFailed(f"HTTP {resp.status_code} without a 'predictions' list: "
                               f"{resp.text[:300]!r}") from None
        try:
            return per_record(predictions, expected)
        except ValueError as exc:
            raise ServerFailed(f"{exc}; a bridge needs one per record") from None


class _Batch:
    """One batch's predictions while they are asked for, kept across waits: the results
    so far, the spans still to ask, each record's failures alone."""

    def __init__(self, records: list[Any]):
        self.records = records
        self.results: list[Any] = [None] * len(records)
        self.spans: list[tuple[int, int]] = [(0, len(records))]
        self.strikes = [0] * len(records)
        self.suspect = False  # the last request failed: check the server before the next
        self.failure = ServerFailed("")


def _failure(exc: requests.RequestException, url: str) -> str:
    """What went wrong with a request, with any credentials in the URL redacted."""
    return redact_url(f"{type(exc).__name__}: {exc}", secrets_of=url)


def _misconfigured(url: str, resp: requests.Response) -> str:
    if resp.status_code in (401, 403):
        fix = "give the bridge credentials the server accepts, or check API_URL"
    else:
        fix = "check API_URL and API_ENDPOINT (MLflow's scoring server serves /invocations)"
    return (f"the model server at {url} answered HTTP {resp.status_code} "
            f"({_message(resp)[:200]}): the bridge is misconfigured, not the records; {fix}. "
            "Nothing was committed.")


def _retry_after(resp: requests.Response) -> float:
    """The seconds of a ``Retry-After: <seconds>`` header (0 without one)."""
    try:
        return max(0.0, float(resp.headers.get("Retry-After", 0)))
    except ValueError:
        return 0.0  # an HTTP date: keep our own backoff


def _message(resp: requests.Response) -> str:
    """The server's own words: the ``message`` of a JSON object, else the body's text."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:1000]
    message = body.get("message") if isinstance(body, dict) else None
    return str(resp.text if message is None else message)[:1000]
