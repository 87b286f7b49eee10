"""What the parity check (#38) costs a runtime at start-up, and what it adds to log_model.

A ZTF feature extraction (benchmarks/stream_throughput.py's ``ztf_features``) is logged with
1, 10 and 100 reference records: ZTF alerts generated from the two real packets in
tests/data by tests/ztf_archive.py, cutout stamps cut to 64 bytes (reference records are
stored in the model: keep them small). For each, the table shows the size of the model's
``reference.jsonl``, what the reference adds to ``log_model`` (the same model logged with
``reference_records=[]`` is the baseline) and the check as every runtime runs it at start
(``LoadedPreprocessing.check_parity``: read the file, run the records, compare), the median
of ``--repeat`` checks in this process. The check runs once per process start (per executor
Python worker on Spark), never per record.

Usage::

    python benchmarks/parity_check.py              # 1, 10, 100 records, 20 checks each
    python benchmarks/parity_check.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

import fastavro  # noqa: E402
import mlflow  # noqa: E402

import stream_throughput  # noqa: E402  (the feature extraction, one definition for both)
from ztf_archive import write_archive  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    from mlflow_preproc.runtime.flavor import load_preprocessing

    work = Path(tempfile.mkdtemp(prefix="parity-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    [archive] = write_archive(work / "alerts", 100, 100, stamp_bytes=64, seed=38)
    with open(archive, "rb") as f:
        alerts = list(fastavro.reader(f))

    def log(records) -> tuple[str, float]:
        started = time.perf_counter()
        with mlflow.start_run():
            info = mlflow.preproc.log_model(stream_throughput.ztf_features, name="p",
                                            pip_requirements=[], reference_records=records)
        return info.model_uri, time.perf_counter() - started

    log(alerts[:1])  # warm-up: imports, the store's tables
    rows = []
    for n in (1, 10, 100):
        _, bare = log([])
        uri, logged = log(alerts[:n])
        loaded = load_preprocessing(uri)
        size = Path(loaded.reference.path).stat().st_size
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            report = loaded.check_parity(uri)
            times.append((time.perf_counter() - started) * 1000)
            assert report is not None and report.ok
        rows.append((n, size, (logged - bare) * 1000, statistics.median(times),
                     min(times), max(times)))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.repeat} checks each\n")
    print("| reference records | reference.jsonl | added to log_model | check at start "
          "(median) | spread |")
    print("|---|---|---|---|---|")
    for n, size, added, median, low, high in rows:
        print(f"| {n} | {size / 1024:.0f} kB | {added:+.0f} ms | {median:.1f} ms | "
              f"{low:.1f}–{high:.1f} ms |")


if __name__ == "__main__":
    main()
