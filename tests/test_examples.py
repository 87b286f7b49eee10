"""The runnable examples, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_quickstart_logs_serves_and_predicts(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cwd = tmp_path / "checkout"  # where a user runs it from: nothing is written there
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(EXAMPLES / "quickstart" / "quickstart.py")],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    out = proc.stdout
    assert "3 alerts in, 2 out (bogus one dropped)" in out
    assert "ZTF24aa00001 band=g mag=16.2 snr=18.1 -> bright=1" in out
    assert "ZTF24aa00003 band=r mag=20.3 snr=13.6 -> bright=0" in out


@pytest.mark.slow
@pytest.mark.kafka
def test_fink_alerts_pipeline_on_the_embedded_broker(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "fink_alerts" / "fink_alerts.py"),
                           "--alerts", "60"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "60 ZTF alerts -> 60 feature records -> 60 predictions" in proc.stdout
    # A newcomer's first run shows no raw librdkafka lines and no warnings.
    assert "%6|" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-3000:]
    assert "alert-0: ZTF17aaacxxf band=r mag=15.37 n_prv=22 -> class" in proc.stdout
