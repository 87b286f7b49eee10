"""The peers' rows of ``stream_throughput.py``: (q) Quix Streams and (m) MLServer, each run
from its own virtualenv under ``benchmarks/.venvs/`` (``--setup`` creates them), so that
their pins never touch this project's.

Both run the same function as (c) on the same 1 KB JSON records and broker; their outputs
are watched, counted and checked like every row's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from throughput_common import (
    EXTRA_FIELD, GROUP_SETTINGS, CpuMeter, Result, check_outputs, create_topics,
    delete_topics, fill_topic, fresh_name, result_from_watch, same_record, stop_process,
    watch_output)

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"

# What each peer's virtualenv gets. MLServer 1.7.1 predates two releases it would otherwise
# get: uvloop 0.22 (its inference workers die: "no current event loop") and pandas 3 (its
# pandas codec has no V2 datatype for pandas 3's string dtype).
PEER_REQUIREMENTS = {
    "quix": ["quixstreams>=3,<4"],
    "mlserver": ["mlserver==1.7.1", "mlserver-mlflow==1.7.1", "uvloop<0.22", "pandas<3"],
}
MLSERVER_MODEL = "add-field"
MLSERVER_READY_TIMEOUT_S = 180.0


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def setup() -> int:
    """Create (or update) each peer's virtualenv; returns the exit status."""
    for name, requirements in PEER_REQUIREMENTS.items():
        if not venv_python(name).exists():
            print(f"creating {VENVS / name}", flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(VENVS / name)], check=True)
        print(f"installing {' '.join(requirements)} into {VENVS / name}", flush=True)
        subprocess.run([str(venv_python(name)), "-m", "pip", "install", "-q", *requirements],
                       check=True, env=_clean_env())
    return 0


def installed_version(name: str, package: str) -> str | None:
    """``package``'s version in the peer's virtualenv, or None when it is not there."""
    if not venv_python(name).exists():
        return None
    proc = subprocess.run([str(venv_python(name)), "-c",
                           f"import importlib.metadata as m; print(m.version({package!r}))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


@dataclass
class PeerRow:
    """What ``stream_throughput.build_rows`` needs of a peer's row."""

    label: str
    run: Callable[[], Result] | None
    skipped: str | None = None


# ---- (q) Quix Streams ------------------------------------------------------------------

def quix_row(args, inputs, bootstrap: str, broker, work_dir: Path) -> PeerRow:
    version = installed_version("quix", "quixstreams")
    label = f"(q) Quix Streams {version or '3.x'}"
    if version is None:
        return PeerRow(label, None, f"not run: no {VENVS / 'quix'}; run with --setup first")
    return PeerRow(label, lambda: run_quix(inputs, bootstrap, broker, work_dir))


def start_quix(bootstrap: str, input_topic: str, output_topic: str, log,
               app_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """The Quix app (``peers/quix_app.py``) on ``input_topic``, in a fresh group, its output
    to the file ``log``."""
    return subprocess.Popen(
        [str(venv_python("quix")), str(HERE / "peers" / "quix_app.py"),
         "--bootstrap", bootstrap, "--input-topic", input_topic,
         "--output-topic", output_topic, "--group", fresh_name("group"),
         "--consumer-config", json.dumps(GROUP_SETTINGS), *app_args],
        stdout=log, stderr=subprocess.STDOUT, env=_clean_env())


def run_quix(inputs, bootstrap: str, broker, work_dir: Path, app_args: tuple[str, ...] = ()
             ) -> Result:
    """Fill a fresh topic, start the Quix app on it (with ``app_args``: its guarantee, its
    commit interval), watch its outputs, SIGTERM it."""
    values = inputs.json_values
    input_topic, output_topic = fresh_name("in"), fresh_name("out")
    create_topics(bootstrap, [input_topic, output_topic])
    fill_topic(bootstrap, input_topic, values)
    log_path = work_dir / f"{fresh_name('quix')}.log"
    with open(log_path, "wb") as log:
        proc = start_quix(bootstrap, input_topic, output_topic, log, app_args)
    meter, broker_meter = CpuMeter([proc.pid]), CpuMeter([broker.process.pid])
    try:
        w = watch_output(bootstrap, output_topic, len(values), [proc], [meter, broker_meter])
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    except Exception as exc:
        raise RuntimeError(f"{exc}; log: {log_path}") from None
    finally:
        stop_process(proc)
        delete_topics(bootstrap, [input_topic, output_topic])
    check_outputs(w, inputs.json_records, same_record(extra_field=True))
    # Quix gives each output its input's timestamp: no produce()-time cross-check.
    return result_from_watch(w, inputs.avg_json_bytes(), [meter], broker_meter,
                             stamped_by_loop=False)


# ---- (m) MLServer --------------------------------------------------------------------------

def mlserver_row(args, inputs, bootstrap: str, broker, work_dir: Path) -> PeerRow:
    version = installed_version("mlserver", "mlserver")
    label = f"(m) MLServer {version or '1.7'} Kafka, V2/msg"
    if version is None:
        return PeerRow(label, None, f"not run: no {VENVS / 'mlserver'}; run with --setup first")
    model_dir = work_dir / "mlserver-model"
    return PeerRow(label, lambda: run_mlserver(inputs, bootstrap, broker, work_dir, model_dir))


def v2_request(record: dict) -> dict:
    """One record as MLServer's Kafka input contract wants it: a V2 inference request, each
    field a one-element tensor, decoded by MLServer into a one-row DataFrame."""
    def datatype(value) -> str:
        if isinstance(value, bool):
            return "BOOL"
        if isinstance(value, int):
            return "INT64"
        return "FP64" if isinstance(value, float) else "BYTES"

    return {"inputs": [{"name": k, "shape": [1], "datatype": datatype(v), "data": [v]}
                       for k, v in record.items()],
            "parameters": {"content_type": "pd"}}


def from_v2_response(value: bytes) -> dict:
    """A V2 inference response of a one-row DataFrame, back to a record."""
    response = json.loads(value)
    return {out["name"]: out["data"][0] for out in response["outputs"]}


def run_mlserver(inputs, bootstrap: str, broker, work_dir: Path, model_dir: Path) -> Result:
    """Start MLServer on fresh topics; once it answers, fill its input topic and watch.

    MLServer's Kafka consumer joins no group and starts at the end of the topic, so the
    input cannot be written first: probes are sent until one is answered (the model is then
    loaded and the consumer positioned), then the records, while it runs.
    """
    if not (model_dir / "model-settings.json").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(venv_python("mlserver")), str(HERE / "peers" / "mlserver_model.py"),
                        str(model_dir)], check=True, capture_output=True, env=_clean_env())
    n = inputs.peer_count
    records = inputs.json_records[:n]
    values = [json.dumps(v2_request(r)).encode() for r in records]
    input_topic, output_topic = fresh_name("in"), fresh_name("out")
    create_topics(bootstrap, [input_topic, output_topic])
    log_path = work_dir / f"{fresh_name('mlserver')}.log"
    env = {**_clean_env(), "MLSERVER_KAFKA_ENABLED": "true", "MLSERVER_KAFKA_SERVERS": bootstrap,
           "MLSERVER_KAFKA_TOPIC_INPUT": input_topic, "MLSERVER_KAFKA_TOPIC_OUTPUT": output_topic,
           "MLSERVER_HOST": "127.0.0.1", "MLSERVER_HTTP_PORT": str(_free_port()),
           "MLSERVER_GRPC_PORT": str(_free_port()), "MLSERVER_METRICS_PORT": str(_free_port())}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(VENVS / "mlserver" / "bin" / "mlserver"), "start",
                                 str(model_dir)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # it starts worker processes
    headers = [("mlserver-model", MLSERVER_MODEL.encode())]
    meter, broker_meter = CpuMeter([proc.pid]), CpuMeter([broker.process.pid])
    try:
        _wait_for_an_answer(bootstrap, input_topic, output_topic, headers, values[0], proc)
        fill_topic(bootstrap, input_topic, values, headers=headers)
        w = watch_output(bootstrap, output_topic, n, [proc], [meter, broker_meter],
                         ignore_key_prefix=b"probe")
    except Exception as exc:
        raise RuntimeError(f"{exc}; log: {log_path}") from None
    finally:
        stop_process(proc)
        delete_topics(bootstrap, [input_topic, output_topic])
    check_outputs(w, records, same_record(extra_field=True), decode=from_v2_response)
    avg = sum(len(v) for v in values) / len(values)
    result = result_from_watch(w, avg, [meter], broker_meter)
    result.notes.append(f"input: one V2 inference request per record, {avg:,.0f} B; "
                        f"the records are written while it runs ({EXTRA_FIELD} checked)")
    return result


def _wait_for_an_answer(bootstrap: str, input_topic: str, output_topic: str,
                        headers: list, probe: bytes, proc: subprocess.Popen) -> None:
    """Send probes (keys ``probe<i>``) once a second until MLServer answers one."""
    producer = Producer({"bootstrap.servers": bootstrap})
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": fresh_name("probe"),
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(output_topic, 0, OFFSET_BEGINNING)])
    deadline = time.monotonic() + MLSERVER_READY_TIMEOUT_S
    try:
        for i in range(10_000):
            if proc.poll() is not None:
                raise RuntimeError(f"mlserver exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlserver answered no probe in {MLSERVER_READY_TIMEOUT_S} s")
            producer.produce(input_topic, probe, f"probe{i}".encode(), headers=headers)
            producer.flush(10)
            if any(m.error() is None for m in consumer.consume(10, 1.0)):
                return
    finally:
        consumer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """This environment without what points Python at this project's packages."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
