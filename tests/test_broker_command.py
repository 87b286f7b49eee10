"""``mlflow-preproc broker``: the local broker a newcomer tries a stream on (#19.3)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess

from conftest import BIN, consume, free_port, produce, unique


def start_broker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "mlflow-preproc"), "broker", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_the_broker_command_serves_kafka_until_ctrl_c_then_frees_its_port():
    port, topic = free_port(), unique("raw")
    broker = start_broker("--port", str(port), "--topic", f"{topic}:2")
    try:
        address = broker.stdout.readline().strip()  # printed once the broker listens
        assert address == f"127.0.0.1:{port}"
        produce(address, topic, [json.dumps({"id": i}).encode() for i in range(10)])
        assert sorted(json.loads(m.value())["id"] for m in consume(address, topic, 10)) == \
            list(range(10))
        broker.send_signal(signal.SIGINT)
        assert broker.wait(15) == 0
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait()
    err = broker.stderr.read()
    assert f"listening on 127.0.0.1:{port}" in err and "Ctrl-C" in err
    assert f"{topic} (2 partitions)" in err and "stopped" in err
    assert not listening(port), "the Tansu process outlived the command"


def test_a_taken_port_is_one_line_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = start_broker("--port", str(taken.getsockname()[1]))
        _, err = broker.communicate(timeout=30)
    assert broker.returncode == 2
    assert err.count("\n") == 1 and "is in use" in err and "--port" in err, err


def test_a_bad_topic_spec_is_refused_before_anything_starts():
    broker = start_broker("--port", str(free_port()), "--topic", "raw:zero")
    _, err = broker.communicate(timeout=30)
    assert broker.returncode == 2
    assert "NAME:PARTITIONS" in err and "Traceback" not in err
