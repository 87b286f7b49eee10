"""Quickstart: log a preprocessing model and a classifier in one run, serve, predict.

Runs on a local MLflow store in $TMPDIR/mlflow-preproc-quickstart (or MLFLOW_TRACKING_URI),
with no server, and writes nothing in the folder it is run from:

    python examples/quickstart/quickstart.py

1. logs ``preprocessing/`` (a folder of modules) with ``mlflow.preproc.log_model`` and an
   sklearn model trained on its output, registers both;
2. serves the preprocessing model with the real ``mlflow models serve`` CLI;
3. posts raw alerts to ``/invocations`` and feeds the returned features to the classifier.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
from sklearn.linear_model import LogisticRegression

HERE = Path(__file__).resolve().parent
FEATURES = ["magpsf", "snr", "positive"]


def alert(i: int, rb: float, magpsf: float, fid: int = 1) -> dict:
    return {"objectId": f"ZTF24aa{i:05d}", "candidate": {
        "fid": fid, "rb": rb, "magpsf": magpsf, "sigmapsf": 0.05 + 0.01 * (i % 7),
        "isdiffpos": "t" if i % 3 else "f"}}


def training_alerts(n: int = 200) -> list[dict]:
    rng = np.random.default_rng(0)
    return [alert(i, float(rng.uniform(0.5, 1)), float(rng.uniform(14, 21)), 1 + i % 3)
            for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def invoke(url: str, records: list[dict]) -> list[dict]:
    body = json.dumps({"inputs": records}).encode()
    req = urllib.request.Request(f"{url}/invocations", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["predictions"]


def serve(model_uri: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{mlflow_cli.parent}:{os.environ['PATH']}"},
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"mlflow models serve exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.3)
    raise SystemExit("mlflow models serve did not answer in 90 s")


def main() -> None:
    store = Path(tempfile.gettempdir(), "mlflow-preproc-quickstart")
    store.mkdir(exist_ok=True)
    if "MLFLOW_TRACKING_URI" not in os.environ:
        mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    experiment = "mlflow-preproc-quickstart"
    if mlflow.get_experiment_by_name(experiment) is None and \
            mlflow.get_tracking_uri().startswith(("sqlite:", "file:", "/")):
        # A local store puts a new experiment's artifacts in ./mlruns of the working folder;
        # the example must not write into the folder it is run from.
        mlflow.create_experiment(experiment, artifact_location=(store / "artifacts").as_uri())
    mlflow.set_experiment(experiment)

    with mlflow.start_run() as run:
        prep_info = mlflow.preproc.log_model(
            str(HERE / "preprocessing"), name="preprocessing",
            input_example=alert(0, 0.9, 18.0), registered_model_name="quickstart-preproc",
        )
        # Train on exactly what the preprocessing model produces.
        features = mlflow.pyfunc.load_model(prep_info.model_uri).predict(training_alerts())
        x = np.array([[f[c] for c in FEATURES] for f in features], dtype=float)
        y = (x[:, 0] < 18).astype(int)  # "bright" transients
        clf_info = mlflow.sklearn.log_model(
            LogisticRegression().fit(x, y), name="classifier",
            registered_model_name="quickstart-classifier", input_example=x[:2],
        )
    print(f"run {run.info.run_id}: logged {prep_info.model_uri} and {clf_info.model_uri}")

    proc, url = serve("models:/quickstart-preproc/latest")
    try:
        raw = [alert(1, 0.95, 16.2), alert(2, 0.12, 15.0), alert(3, 0.8, 20.3, fid=2)]
        features = invoke(url, raw)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    classifier = mlflow.pyfunc.load_model("models:/quickstart-classifier/latest")
    scores = classifier.predict(np.array([[f[c] for c in FEATURES] for f in features], float))
    print(f"served at {url}: {len(raw)} alerts in, {len(features)} out (bogus one dropped)")
    for f, s in zip(features, scores):
        print(f"  {f['objectId']} band={f['band']} mag={f['magpsf']:.1f} snr={f['snr']:.1f}"
              f" -> bright={int(s)}")


if __name__ == "__main__":
    main()
