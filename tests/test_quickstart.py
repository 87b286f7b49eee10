"""The README's quickstart, step 4, as written, on the embedded broker: what a newcomer sees
when the stream is up and when it is not (#37). tests/test_docs.py runs the whole README."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import mlflow
import pytest

from conftest import BIN, committed_offsets, consume, free_port, produce
from test_docs import ROOT, blocks

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

README = ROOT / "README.md"


def readme_file(name: str) -> str:
    """The README block written to ``name`` (``<!-- file: name -->``)."""
    (block,) = [b for b in blocks(README) if b.mark == "file" and b.argument == name]
    return block.text


def readme_stream_command() -> tuple[dict[str, str], list[str]]:
    """Step 4's stream command: its environment assignments and its arguments."""
    (text,) = [b.text for b in blocks(README) if b.language == "bash"
               and "mlflow-preproc stream" in b.text]
    line = re.search(r"^((?:[A-Z_]+=\S+ )*)mlflow-preproc stream (.*?) 2> stream\.log &$",
                     text.replace("\\\n", " "), re.M)
    assert line, text
    env = dict(word.split("=", 1) for word in line.group(1).split())
    return env, line.group(2).split()


def newcomer_env(bootstrap: str) -> dict[str, str]:
    """A newcomer's environment: no MLflow or librdkafka settings but what the README sets,
    and the fixture's broker in place of 127.0.0.1:9092."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "LIBRDKAFKA_", "KAFKA_"))}
    return {**env, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}


def test_the_reader_gives_up_with_the_streams_error_when_the_stream_died(embedded_broker,
                                                                           tmp_path):
    """Run from a folder without the quickstart's store, the stream exits 2 at once; the
    documented reader polled for ever and printed nothing."""
    servers = embedded_broker.bootstrap_servers
    embedded_broker.create_topics("alerts", "features")
    env, args = readme_stream_command()
    with open(tmp_path / "stream.log", "w") as log:
        stream = subprocess.run([str(BIN / "mlflow-preproc"), "stream", *args], stderr=log,
                                cwd=tmp_path, env={**newcomer_env(servers), **env},
                                timeout=300)
    assert stream.returncode == 2
    (tmp_path / "try_stream.py").write_text(
        readme_file("try_stream.py").replace("127.0.0.1:9092", servers))
    reader = subprocess.run([str(BIN / "python"), "try_stream.py"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env=newcomer_env(servers))
    assert reader.returncode == 1, reader.stderr[-2000:]
    assert "waiting for the stream's first output" in reader.stderr
    assert reader.stderr.strip().splitlines()[-1].startswith(
        "mlflow-preproc stream: error: models:/quickstart/1 needs an MLflow store"), \
        reader.stderr[-2000:]


def test_the_stream_joins_in_seconds_and_status_says_what_the_broker_gets_wrong(
        embedded_broker, tracking_uri, tmp_path):
    """The quickstart's first output took 27.5 s, most of it the embedded broker waiting half
    librdkafka's 45 s session timeout before it forms a group: the README's settings cut the
    wait (troubleshooting.md says which). Then `status` on that stream: the embedded broker
    lists no members and end offsets behind the committed ones, which status printed as
    facts (lag 0), and a group it has never seen read EMPTY, like a stopped stream."""
    with mlflow.start_run():
        model = mlflow.preproc.log_model(lambda r: r, name="p", pip_requirements=[]).model_uri
    servers = embedded_broker.bootstrap_servers
    topic = f"alerts-{os.getpid()}"
    group = f"group-{topic}"
    embedded_broker.create_topics(topic)
    env, _ = readme_stream_command()
    log, port = tmp_path / "stream.log", free_port()
    stream = subprocess.Popen(
        [str(BIN / "mlflow-preproc"), "stream", "-m", model, "--input-topic", topic,
         "--output-topic", f"{topic}-out", "--consumer-group-id", group,
         "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
        stderr=open(log, "w"), env={**newcomer_env(servers), "MLFLOW_TRACKING_URI": tracking_uri,
                                    "LOG_FORMAT": "json", **env})
    try:
        deadline = time.monotonic() + 120  # the start-up, under load; the join is bounded below
        while not (events := _events(log, "assign")) and time.monotonic() < deadline \
                and stream.poll() is None:
            time.sleep(0.5)
        assert events, log.read_text()[-3000:]
        (joining,) = _events(log, "start")
        waited = _at(events[0]) - _at(joining)
        assert waited < 10, f"the group formed {waited:.0f} s after the stream joined it"

        produce(servers, topic, [json.dumps({"id": i}).encode() for i in range(3)])
        consume(servers, f"{topic}-out", 3)
        while committed_offsets(servers, group, topic) != [3] and time.monotonic() < deadline:
            time.sleep(0.5)
        shown = status("--group", group, "--topic", topic, "--metrics",
                       f"http://127.0.0.1:{port}", "--interval", "0.5", bootstrap=servers)
        assert shown.returncode == 0, shown.stderr[-2000:]
        said = shown.stdout.splitlines()[1]
        assert said.startswith("the broker's answers are inconsistent ("), shown.stdout
        for contradiction in (f"{topic}/0 is committed up to 3, past its end offset",
                              "the group is STABLE but the broker lists no members",
                              f"http://127.0.0.1:{port} own partitions but the broker lists "
                              "no members"):
            assert contradiction in said, shown.stdout
        assert said.endswith("the instances' own lag is (--metrics)"), shown.stdout

        misspelled = status("--group", group + "x", "--topic", topic, bootstrap=servers)
        assert misspelled.returncode == 2 and misspelled.stderr.strip() == (
            f"mlflow-preproc status: error: group {group}x does not exist on {servers} (the "
            "broker has never seen it, or its offsets expired); pass the stream's "
            "CONSUMER_GROUP_ID (default mlflow-preproc-{model name})"), misspelled.stderr
    finally:
        stream.terminate()
        stream.wait(60)


def status(*args: str, bootstrap: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mlflow-preproc"), "status", *args,
                           "--kafka-bootstrap-servers", bootstrap],
                          capture_output=True, text=True, timeout=120)


def _events(log, name: str) -> list[dict]:
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == name:
                found.append(entry)
    return found


def _at(entry: dict) -> float:
    """A log entry's time (``asctime``: 2026-12-06 10:58:57,141) in seconds."""
    from datetime import datetime

    return datetime.strptime(entry["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
