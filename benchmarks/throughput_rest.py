"""The REST rows of ``stream_throughput.py``: ``mlflow models serve`` of the preprocessing
model of (c) against a stock ``mlflow.pyfunc.PythonModel`` doing the same
(``peers/pyfunc_add_field.py``), both in this environment, same server, same client.

One client posts ``{"dataframe_records": [100 records]}`` to ``/invocations`` one request
after the other on one keep-alive connection, after 10 warm-up requests. Outputs are the
records of each response (``{"predictions": [...]}``), counted and checked; the rate is the
table's: records after the first response / (last response - first response).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from throughput_common import CpuMeter, Result, add_field, rate_window, stop_process

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
BATCH = 100
WARM_UP_REQUESTS = 10
SERVE_READY_TIMEOUT_S = 180.0


def rows(inputs, tracking_uri: str, preprocessing_uri: str, work_dir: Path
         ) -> list[tuple[str, str, Callable[[], Result]]]:
    """(key, label, run) of the two REST rows; the pyfunc is logged on first use."""
    pyfunc_uri: list[str] = []

    def run_pyfunc() -> Result:
        if not pyfunc_uri:
            pyfunc_uri.append(log_stock_pyfunc(tracking_uri))
        return run_rest(inputs, tracking_uri, pyfunc_uri[0], work_dir)

    return [
        ("rp", "(rp) REST: preprocessing model",
         lambda: run_rest(inputs, tracking_uri, preprocessing_uri, work_dir)),
        ("rf", "(rf) REST: stock PythonModel", run_pyfunc),
    ]


def log_stock_pyfunc(tracking_uri: str) -> str:
    """Register ``peers/pyfunc_add_field.py`` (models from code); returns its model URI."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="pyfunc", python_model=str(HERE / "peers" /
                                                                "pyfunc_add_field.py"),
                                registered_model_name="bench-pyfunc-add-field")
    return "models:/bench-pyfunc-add-field/1"


def run_rest(inputs, tracking_uri: str, model_uri: str, work_dir: Path) -> Result:
    """Serve ``model_uri``, post the batches, check every response; stop the server."""
    port = _free_port()
    log_path = work_dir / f"serve-{port}.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # its uvicorn
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    meter = CpuMeter([proc.pid])
    try:
        conn = _wait_until_serving(port, proc)
        batches = _batches(inputs.json_records, WARM_UP_REQUESTS + inputs.rest_requests)
        for batch in batches[:WARM_UP_REQUESTS]:
            _post(conn, batch)
        arrivals, latencies, answers = [], [], []
        meter.start()
        for batch in batches[WARM_UP_REQUESTS:]:
            sent = time.monotonic()
            answers.append(_post(conn, batch))
            arrivals.append(time.monotonic())
            latencies.append((arrivals[-1] - sent) * 1000)
        meter.stop()
    except Exception as exc:
        raise RuntimeError(f"{exc}; log: {log_path}") from None
    finally:
        stop_process(proc)
    for batch, answer in zip(batches[WARM_UP_REQUESTS:], answers):
        _check(batch, answer)
    # Each response brings BATCH outputs at once: count records, not requests.
    requests_after_first, seconds = rate_window(arrivals)
    records = requests_after_first * BATCH
    avg_bytes = inputs.avg_json_bytes()
    return Result(records, seconds, records * avg_bytes, cpu=meter.cores,
                  latencies_ms=latencies)


def _batches(records: list[dict], count: int) -> list[list[dict]]:
    """``count`` batches of BATCH records, going round the records if there are too few."""
    return [[records[(i * BATCH + j) % len(records)] for j in range(BATCH)]
            for i in range(count)]


def _post(conn: http.client.HTTPConnection, batch: list[dict]) -> bytes:
    body = json.dumps({"dataframe_records": batch})
    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"/invocations answered {response.status}: {data[:500]!r}")
    return data


def _check(batch: list[dict], answer: bytes) -> None:
    predictions = json.loads(answer)["predictions"]
    wanted = [add_field(dict(r)) for r in batch]
    if predictions != wanted:
        bad = next(i for i, (p, w) in enumerate(zip(predictions, wanted)) if p != w) \
            if len(predictions) == len(wanted) else "count"
        raise RuntimeError(f"wrong prediction (record {bad} of a batch)")


def _wait_until_serving(port: int, proc: subprocess.Popen) -> http.client.HTTPConnection:
    deadline = time.monotonic() + SERVE_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/ping")
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return conn
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve did not answer /ping in {SERVE_READY_TIMEOUT_S} s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

