"""An alert archive through ``mlflow-preproc run`` and through ``--engine spark``.

The same archive of 10,000 ZTF alerts (generated from the two real packets in tests/data by
tests/ztf_archive.py: real schemas, histories and full-size cutouts; one Avro container per
file, as alert archives are kept) goes through the real console script three ways:

(a) ``mlflow-preproc run``                          one Python process (the baseline)
(b) ``mlflow-preproc run --engine spark --master local[1]``
(c) ``mlflow-preproc run --engine spark --master local[2]``
(d) (c) with the JVM's JIT compiler stopped at C1 (``-XX:TieredStopAtLevel=1``)

with the ZTF feature extraction of benchmarks/stream_throughput.py and ``--skip-cutouts``,
JSON Lines out. Each run's outputs are checked against (a)'s, line for line (order aside).

Method: each configuration runs ``--repeat`` times on the archive and as many times on an
archive of one alert; the table shows medians. ``wall`` is the whole command, as a user
waits for it; ``start-up`` is the one-alert run (JVM, Python workers importing MLflow, model
download and load, the jobs' fixed costs); the rate after start-up is
``alerts / (wall - start-up)``, what a bigger archive approaches. The speed-up is against
(a), after start-up; per core, divided by the cores Spark was given. ``CPU`` is user +
system time of the command's process tree, sampled from /proc: the driver (the command
itself), the JVM, and the Python workers that run pre_processing.

Usage::

    python benchmarks/spark_batch.py                 # 10,000 alerts, 3 runs each (~10 min here)
    python benchmarks/spark_batch.py --quick         # 2,000 alerts, once
    python benchmarks/spark_batch.py --per-file 100  # packed: 100 alerts per container
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

import cloudpickle  # noqa: E402
import mlflow  # noqa: E402

import stream_throughput  # noqa: E402  (the feature extraction, one definition for both)
from ztf_archive import write_archive  # noqa: E402

SPARK_ARGS = "--conf spark.ui.enabled=false"
# (d) is (c) with the JVM's JIT stopped at C1: on 2 CPUs, C2 compiling Spark's code at
# start-up takes as much CPU as the Python workers (see the CPU column).
C1_ONLY = "--driver-java-options -XX:TieredStopAtLevel=1"
CONFIGS = [
    ("(a) mlflow-preproc run", 1, [], ""),
    ("(b) --engine spark local[1]", 1, ["--engine", "spark", "--master", "local[1]"], ""),
    ("(c) --engine spark local[2]", 2, ["--engine", "spark", "--master", "local[2]"], ""),
    ("(d) (c), JVM JIT at C1 only", 2, ["--engine", "spark", "--master", "local[2]"], C1_ONLY),
]


@dataclass
class Timing:
    wall: float
    cpu: dict[str, float]  # CPU seconds by kind of process: driver, jvm, workers


class TreeCPU(threading.Thread):
    """CPU time of a process and all its descendants, by kind, sampled from /proc.

    getrusage(RUSAGE_CHILDREN) misses the Python workers (the JVM never waits for them), so
    the tree is walked every 0.2 s and each process's last utime + stime is kept.
    """

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.done = root, threading.Event()
        self.seen: dict[int, tuple[str, float]] = {}
        self._tick = os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.sample()

    def sample(self) -> None:
        parents, stats = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            pid = int(entry)
            parents[pid] = int(fields[1])
            stats[pid] = ((int(fields[11]) + int(fields[12])) / self._tick, cmdline)
        for pid, (cpu, cmdline) in stats.items():
            ancestor = pid
            while ancestor not in (self.root, 0, 1) and ancestor in parents:
                ancestor = parents[ancestor]
            if ancestor == self.root:
                # The kind is decided while the process runs: an exited one has no cmdline.
                kind = self.seen[pid][0] if pid in self.seen else _kind(pid, self.root, cmdline)
                self.seen[pid] = (kind, cpu)

    def totals(self) -> dict[str, float]:
        out = {"driver": 0.0, "jvm": 0.0, "workers": 0.0}
        for kind, cpu in self.seen.values():
            out[kind] += cpu
        return out


def _kind(pid: int, root: int, cmdline: bytes) -> str:
    if pid == root:
        return "driver"
    argv = cmdline.split(b"\0")
    if b"pyspark.daemon" in argv or b"pyspark.worker" in argv:
        return "workers"
    return "jvm"  # java and the scripts that launch it


def run_once(model_uri: str, inputs: list[str], extra: list[str], out: Path,
             env: dict) -> Timing:
    """One run of the console script; wall time and CPU time of its process tree."""
    for stale in (out, Path(f"{out}.rejects.jsonl")):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    script = Path(sys.executable).parent / "mlflow-preproc"
    started = time.monotonic()
    proc = subprocess.Popen([str(script), "run", "-m", model_uri, *inputs, "--skip-cutouts",
                             "-o", str(out), "--no-progress", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    sampler = TreeCPU(proc.pid)
    sampler.start()
    stderr = proc.stderr.read()
    sampler.sample()  # the last look before the tree exits
    proc.wait(1800)
    wall = time.monotonic() - started
    sampler.done.set()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(extra) or 'run'} failed ({proc.returncode}):\n"
                         f"{stderr.decode()[-3000:]}")
    return Timing(wall, sampler.totals())


def output_lines(path: Path) -> list[bytes]:
    files = sorted(path.rglob("part-*")) if path.is_dir() else [path]
    return sorted(line for f in files for line in f.read_bytes().splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alerts", type=int, default=10_000, help="alerts in the archive")
    p.add_argument("--per-file", type=int, default=1, help="alerts per Avro container file")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration (median)")
    p.add_argument("--quick", action="store_true", help="2,000 alerts, once each")
    args = p.parse_args(argv)
    if args.quick:
        args.alerts, args.repeat = 2_000, 1

    work = Path(tempfile.mkdtemp(prefix="spark-batch-"))
    try:
        started = time.monotonic()
        archive = write_archive(work / "archive", args.alerts, args.per_file)
        tiny = write_archive(work / "tiny", 1, 1)
        size = sum(f.stat().st_size for f in archive)
        print(f"archive: {args.alerts:,} alerts in {len(archive):,} files, "
              f"{size / 1e6:,.0f} MB ({size / args.alerts / 1e3:.1f} kB per alert, cutouts "
              f"included); generated in {time.monotonic() - started:.0f} s", flush=True)

        uri = f"sqlite:///{work / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        cloudpickle.register_pickle_by_value(stream_throughput)  # no import needed to load it
        with mlflow.start_run():
            model = mlflow.preproc.log_model(stream_throughput.ztf_features, name="ztf",
                                             registered_model_name="bench-ztf").model_uri
        rows, reference = [], None
        for name, cores, extra, java in CONFIGS:
            env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
                   "PYSPARK_SUBMIT_ARGS": f"{SPARK_ARGS} {java} pyspark-shell"}
            spark = bool(extra)
            # run takes files; Spark is given the folder, as for a real archive
            inputs = [str(work / "archive")] if spark else [str(f) for f in archive]
            tiny_inputs = [str(work / "tiny")] if spark else [str(f) for f in tiny]
            out = work / ("out" if spark else "out.jsonl")
            print(f"running {name} ({args.repeat}x) ...", flush=True)
            full, small = [], []
            for _ in range(args.repeat):
                small.append(run_once(model, tiny_inputs, extra, work / "tiny-out", env))
                full.append(run_once(model, inputs, extra, out, env))
            lines = output_lines(out)  # (the last run's)
            if reference is None:
                reference = lines
            elif lines != reference:
                raise SystemExit(f"{name}: the outputs differ from run's")
            median = sorted(full, key=lambda t: t.wall)[len(full) // 2]
            start_up = statistics.median(t.wall for t in small)
            rows.append((name, cores, median.wall, median.cpu, start_up,
                         args.alerts / median.wall,
                         args.alerts / max(median.wall - start_up, 1e-9)))

        base = rows[0][6]
        print()
        print("| run | cores | wall s | alerts/s | start-up s | alerts/s after start-up | "
              "speed-up | per core | CPU s: driver / JVM / workers |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, cores, wall, cpu, start_up, rate, steady in rows:
            speed_up = steady / base
            print(f"| {name} | {cores} | {wall:.1f} | {rate:,.0f} | {start_up:.1f} "
                  f"| {steady:,.0f} | {speed_up:.2f} | {speed_up / cores:.2f} "
                  f"| {cpu['driver']:.1f} / {cpu['jvm']:.1f} / {cpu['workers']:.1f} |")
        print()
        print(f"outputs: {len(reference):,} lines, identical in all runs (order aside)")
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"machine: {os.cpu_count()} CPUs, {platform.python_implementation()} "
              f"{platform.python_version()}, load average before the table {load}; "
              f"total {time.monotonic() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
