"""The alert rules and the dashboard, checked by Prometheus itself: promtool on the rules (and
a unit test of each alert on synthetic series), then a real Prometheus scraping a real stream,
evaluating every alert expression and every dashboard query, which must name only series the
stream exports. The dashboard is read back by the Grafana SDK's own model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import BIN, consume, free_port, produce, stream_env, unique
from mlflow_preproc.monitoring import alert_rules

pytestmark = pytest.mark.prometheus


def require(tool: str) -> str:
    """The path of a Prometheus tool; skip without it, fail under CI=true (CI installs it)."""
    found = shutil.which(tool)
    if found is None:
        message = f"{tool} is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mlflow-preproc"), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory) -> Path:
    out = cli("alert-rules")
    assert out.returncode == 0, out.stderr
    path = tmp_path_factory.mktemp("rules") / "preproc-rules.yml"
    path.write_text(out.stdout)
    return path


def test_promtool_accepts_the_rules(rules_file):
    checked = subprocess.run([require("promtool"), "check", "rules", str(rules_file)],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules.alerts())} rules found" in checked.stdout


# Each alert: the series that must make it fire, and ones that must not (a healthy stream).
_T = {"job": "preproc", "instance": "10.0.0.1:9100", "command": "stream"}


def _series(name: str, values: str, **labels: str) -> dict:
    merged = {**_T, **labels}
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in merged.items()) + "}",
            "values": values}


UNIT_TESTS = [
    ("PreprocConsumerLagGrowing", "20m",
     [_series("mlflow_preproc_consumer_lag", "0+200x40", topic="raw", partition="0")],
     [_series("mlflow_preproc_consumer_lag", "5000x40", topic="raw", partition="0")],
     {"job": "preproc", "topic": "raw", "severity": "warning"}),
    ("PreprocNoProgress", "15m",
     [_series("mlflow_preproc_records_total", "100x30", outcome="in"),
      _series("mlflow_preproc_consumer_lag", "500x30", topic="raw", partition="0"),
      _series("mlflow_preproc_waiting_for_dependency", "0x30"),
      _series("mlflow_preproc_partitions_assigned", "1x30")],
     [_series("mlflow_preproc_records_total", "100x30", outcome="in"),
      _series("mlflow_preproc_consumer_lag", "500x30", topic="raw", partition="0"),
      _series("mlflow_preproc_waiting_for_dependency", "1x30"),  # the model server is down
      _series("mlflow_preproc_partitions_assigned", "1x30")],
     {"job": "preproc", "instance": _T["instance"], "severity": "critical"}),
    ("PreprocDeadLetterRatioHigh", "15m",
     [_series("mlflow_preproc_records_total", "0+100x30", outcome="in"),
      _series("mlflow_preproc_records_total", "0+20x30", outcome="failed")],
     [_series("mlflow_preproc_records_total", "0+100x30", outcome="in"),
      _series("mlflow_preproc_records_total", "0+1x30", outcome="failed")],
     {"job": "preproc", "severity": "warning"}),
    ("PreprocDeadLetterBrake", "2m",
     [_series("mlflow_preproc_dead_letter_brake", "0 1 1 1")],
     [_series("mlflow_preproc_dead_letter_brake", "0 0 0 0")],
     {"job": "preproc", "instance": _T["instance"], "severity": "critical"}),
    # revision 2 replaced revision 1 at 5m, was not healthy, and revision 1 runs again
    ("PreprocRolloutRolledBack", "10m",
     [_series("mlflow_preproc_revision", "1 1 1 1 1 _ _ _ 1 1 1", deployment="fink"),
      _series("mlflow_preproc_revision", "_ _ _ _ _ 2 2 2 stale", deployment="fink",
              instance="10.0.0.2:9100")],
     # a rollout that succeeded: revision 1 stopped, revision 2 runs on
     [_series("mlflow_preproc_revision", "1 1 1 1 1 stale", deployment="fink"),
      _series("mlflow_preproc_revision", "_ _ _ _ _ 2 2 2 2 2 2", deployment="fink",
              instance="10.0.0.2:9100"),
      # a stream the target did not start, and another deployment still on its revision 3
      _series("mlflow_preproc_revision", "0x10", deployment=""),
      _series("mlflow_preproc_revision", "3x10", deployment="other")],
     {"job": "preproc", "deployment": "fink", "severity": "warning"}),
    ("PreprocInstanceDown", "10m",
     [_series("up", "1 1 0x10", command=""),
      _series("mlflow_preproc_records_total", "5 5", outcome="in")],
     [_series("up", "1x12", command=""),
      _series("mlflow_preproc_records_total", "5x12", outcome="in")],
     {"job": "preproc", "instance": _T["instance"], "severity": "critical"}),
]


# The value an alert's annotations show, where they show one.
VALUES = {"PreprocRolloutRolledBack": "2"}


def test_every_alert_fires_on_its_fault_and_not_on_a_healthy_stream(rules_file, tmp_path):
    assert sorted(t[0] for t in UNIT_TESTS) == sorted(a.name for a in alert_rules.alerts())
    tests = []
    for name, at, firing, healthy, labels in UNIT_TESTS:
        for series, expected in ((firing, [{"exp_labels": labels}]), (healthy, [])):
            for s in series:  # `up` has no command label
                s["series"] = s["series"].replace(',command=""', "")
            tests.append({"interval": "1m", "input_series": series, "alert_rule_test": [
                {"eval_time": at, "alertname": name, "exp_alerts": [
                    {**e, "exp_annotations": _annotations(name, labels, VALUES.get(name, ""))}
                    for e in expected]}]})
    unit = tmp_path / "alerts_test.yml"
    unit.write_text(yaml.safe_dump({"rule_files": [str(rules_file)],
                                    "evaluation_interval": "1m", "tests": tests}))
    ran = subprocess.run([require("promtool"), "test", "rules", str(unit)],
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout + ran.stderr


def _annotations(name: str, labels: dict, value: str) -> dict:
    """The annotations promtool expands for ``name`` (templates over the firing labels and
    the alert's value)."""
    alert = next(a for a in alert_rules.alerts() if a.name == name)
    expand = lambda text: re.sub(r"\{\{ \$labels\.(\w+) \}\}",  # noqa: E731
                                 lambda m: labels.get(m.group(1), ""),
                                 text.replace("{{ $value }}", value))
    return {"summary": expand(alert.summary), "description": expand(alert.description)}


def test_the_dashboard_reads_back_as_the_sdks_model():
    pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.models.dashboard import Dashboard

    from mlflow_preproc.monitoring.dashboard import PANELS

    out = cli("dashboard")
    assert out.returncode == 0, out.stderr
    model = Dashboard.from_json(json.loads(out.stdout))
    panels = [p for p in model.panels if getattr(p, "type_val", "") == "timeseries"]
    assert [p.title for p in panels] == [title for _, title, _, _ in PANELS]
    assert all(p.targets for p in panels)
    assert [v.name for v in model.templating.list_val] == ["job", "instance"]
    # "All" is every job that exports the stream's series, not ".*": the process_* panels
    # would show every job Prometheus scrapes
    assert all(not v.all_value for v in model.templating.list_val)


def test_a_stream_exports_its_record_series_from_the_start_and_the_lag_of_what_it_owns():
    from prometheus_client import generate_latest

    from mlflow_preproc.streaming.metrics import LoopStats

    stats = LoopStats("stream")
    # before any record: NoProgress and InstanceDown see a consumer stuck since its start
    exported = generate_latest(stats.registry).decode()
    for outcome in ("in", "out", "failed"):
        assert f'mlflow_preproc_records_total{{command="stream",outcome="{outcome}"}} 0.0' \
            in exported

    def lag_series() -> list[str]:
        return sorted(line.split(" ")[0] for line in
                      generate_latest(stats.registry).decode().splitlines()
                      if line.startswith("mlflow_preproc_consumer_lag{"))

    librdkafka = json.dumps({"topics": {"raw": {"partitions": {
        "0": {"consumer_lag": 5}, "1": {"consumer_lag": 7}, "-1": {"consumer_lag": -1}}}}})
    stats.assigned([("raw", 0), ("raw", 1)], {("raw", 0), ("raw", 1)})
    stats.on_librdkafka_stats(librdkafka)
    assert lag_series() == ['mlflow_preproc_consumer_lag{partition="0",topic="raw"}',
                            'mlflow_preproc_consumer_lag{partition="1",topic="raw"}']
    # partition 1 revoked: its lag is another member's now (summed twice, it would double)
    stats.assigned([], {("raw", 0)})
    stats.on_librdkafka_stats(librdkafka)  # librdkafka may still report it for a while
    assert lag_series() == ['mlflow_preproc_consumer_lag{partition="0",topic="raw"}']


@pytest.mark.slow
@pytest.mark.kafka
def test_a_real_prometheus_scrapes_a_stream_and_every_query_finds_its_series(
        rules_file, broker, tracking_uri, streams, tmp_path):
    prometheus = require("prometheus")
    from mlflow_preproc.monitoring.dashboard import queries

    def features(record):
        return {"id": record["id"], "double": record["x"] * 2}  # KeyError without x

    with mlflow.start_run():
        model = mlflow.preproc.log_model(features, name="p", pip_requirements=[]).model_uri
    topic, metrics_port = unique("raw"), free_port()
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic,
            [json.dumps({"id": i, "x": i} if i % 10 else {"id": i}).encode() for i in range(300)])
    stream = streams(stream_env(broker.bootstrap_servers, model, topic,
                                OUTPUT_TOPIC=unique("clean"), METRICS_PORT=str(metrics_port),
                                METRICS_HOST="127.0.0.1", MLFLOW_PREPROC_DEPLOYMENT="fink",
                                MLFLOW_PREPROC_REVISION="3"))

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_file)],
        "scrape_configs": [{"job_name": "preproc",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    server = subprocess.Popen([prometheus, f"--config.file={config}",
                               f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "wb"))
    try:
        consume(broker.bootstrap_servers, f"{topic}-dlq", 30)

        def api(path: str, **params: str) -> dict:
            url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
            assert body["status"] == "success", body
            return body["data"]

        def names() -> set[str]:
            return set(api("label/__name__/values"))

        wanted = {"mlflow_preproc_dead_letters_total", "mlflow_preproc_commits_total",
                  "mlflow_preproc_consumer_lag", "mlflow_preproc_batch_seconds_bucket"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if wanted <= names():
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(1)
        time.sleep(3)  # a few more scrapes, so rate() has two points
        exported = names()
        assert wanted <= exported, sorted(exported)

        # Every expression is valid PromQL on this Prometheus and names only exported series.
        expressions = [a.expr for a in alert_rules.alerts()] + queries()
        for expr in expressions:
            for metric in set(re.findall(r"\b((?:mlflow_preproc|process)_\w+|up)\b", expr)):
                assert metric in exported, f"{metric} (in {expr}) is not exported"
            api("query", query=expr)
        # The panels a user looks at first show this stream's data.
        for expr in queries()[:3]:
            assert api("query", query=expr)["result"], expr
        by_kind = api("query", query="sum by (stage, error_type) "
                                     "(mlflow_preproc_dead_letters_total)")["result"]
        assert [(r["metric"]["stage"], r["metric"]["error_type"], r["value"][1])
                for r in by_kind] == [("preprocess", "KeyError", "30")]
        revision = api("query", query="mlflow_preproc_revision")["result"]
        assert [(r["metric"]["deployment"], r["value"][1]) for r in revision] == [("fink", "3")]
        # The rules loaded, and a healthy stream fires none of them.
        groups = api("rules")["groups"]
        assert [r["name"] for r in groups[0]["rules"]] == [a.name for a in alert_rules.alerts()]
        assert all(r["health"] == "ok" for r in groups[0]["rules"]), groups
        assert [a for a in api("alerts")["alerts"] if a["state"] == "firing"] == []
        # Looked at as a user would: the panels drawn from this Prometheus (a test artifact).
        from mlflow_preproc.monitoring.snapshot import render

        png = tmp_path / "dashboard.png"
        drawn = render(f"http://127.0.0.1:{port}", str(png), time.time() - 30, time.time(), 1)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert drawn["Records per second"] >= 3 and drawn["Process memory"] == 1, drawn
    finally:
        server.terminate()
        server.wait(30)
        stream.stop()
