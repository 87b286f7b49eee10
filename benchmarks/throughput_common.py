"""What every row of ``stream_throughput.py`` shares: records, broker helpers, the watcher,
the one rate definition, CPU sampling, results.

The rate of every row, whatever it runs::

    records/s = (outputs that arrived after the first one) / (last arrival - first arrival)

An output is a record landing in the output topic (read by a watcher), a record in an HTTP
response (REST rows) or a decoded record (decode rows). Start-up, model loading and the
consumer-group join all happen before the first output, so they are left out.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fastavro
from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_CREATE_TIME, Consumer, Producer, \
    TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

# Tansu joins a group in about session.timeout.ms / 2 (FIELD-NOTES section 7). Every client
# of every row that joins a group gets these.
GROUP_SETTINGS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
SCENARIO_TIMEOUT_S = 600.0
ZTF_STRING_FIELDS = ("isdiffpos", "programpi", "rbversion", "ssnamenr")
N_NUMERIC_FIELDS = 34
EXTRA_FIELD = "candid_next"


# ---- the function every row runs -------------------------------------------------------

def add_field(record: dict) -> dict:
    """Identity plus one field: what (c) and the peers do to each record (peers/ has copies,
    as the peers' virtualenvs cannot import this module)."""
    record[EXTRA_FIELD] = record["candid"] + 1
    return record


# ---- input data ------------------------------------------------------------------------

def make_json_records(n: int, alert_bytes: bytes, seed: int = 42) -> list[bytes]:
    """``n`` JSON records of about 1 KB: a ZTF candidate flattened, values jittered per record."""
    alert = next(iter(fastavro.reader(io.BytesIO(alert_bytes))))
    candidate = alert["candidate"]
    numeric = [k for k, v in candidate.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)][:N_NUMERIC_FIELDS]
    rng = random.Random(seed)
    values = []
    for i in range(n):
        record: dict = {"objectId": f"ZTF18{i:07d}", "candid": candidate["candid"] + i}
        for key in numeric:
            v = candidate[key]
            record[key] = v if isinstance(v, int) else v * (1 + rng.uniform(-1e-3, 1e-3))
        for key in ZTF_STRING_FIELDS:
            record[key] = candidate.get(key) or ""
        values.append(json.dumps(record).encode())
    return values


# ---- broker helpers --------------------------------------------------------------------

_name_counter = 0


def fresh_name(prefix: str) -> str:
    """A topic or group name used once: a reused group can get stuck on Tansu."""
    global _name_counter
    _name_counter += 1
    return f"bench-{prefix}-{os.getpid()}-{_name_counter}"


def create_topics(bootstrap: str, topics: list[str], partitions: int = 1) -> None:
    """Create fresh topics (the loops under test then find them ready)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, partitions, 1) for t in topics]).values():
        future.result(15)


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Free the broker's memory (Tansu keeps everything in RAM)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(topics, operation_timeout=15).values():
        try:
            future.result(15)
        except Exception:  # noqa: BLE001 -- best effort, the broker goes away at the end anyway
            pass


def fill_topic(bootstrap: str, topic: str, values: list[bytes],
               headers: list[tuple[str, bytes]] | None = None,
               transactional_id: str | None = None) -> Producer:
    """Produce ``values`` keyed by index and wait until the broker has them all.

    Partitions are chosen by librdkafka's default partitioner on the key, as the loops
    under test choose their outputs' partitions: with as many output partitions as input
    ones, each output partition then has one writer. (Several processes writing to one
    partition at once made Tansu lose outputs for a reader reading meanwhile.)

    With ``transactional_id`` the values are written in a transaction left open: consumers
    (read_committed, librdkafka's default) see none of them until the caller commits it
    with ``commit_transaction()`` on the returned producer, and then all at once.
    """
    settings = {"bootstrap.servers": bootstrap, "linger.ms": 20, "message.max.bytes": 2_000_000}
    if transactional_id:
        settings |= {"transactional.id": transactional_id, "transaction.timeout.ms": 300_000}
    producer = Producer(settings)
    if transactional_id:
        producer.init_transactions(30)
        producer.begin_transaction()
    for i, value in enumerate(values):
        while True:
            try:
                producer.produce(topic, value, str(i).encode(), headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} messages were not acknowledged while filling {topic}")
    return producer


# ---- CPU use of the processes under test -------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` and all their descendants (from /proc)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    wanted, total = set(pids), 0
    changed = True
    while changed:  # add children until no new descendant appears
        changed = False
        for pid, (ppid, _) in stats.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                changed = True
    for pid in wanted:
        total += stats.get(pid, (0, 0))[1]
    return total / _CLOCK_TICKS


class CpuMeter:
    """CPU cores used by some processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self._start: tuple[float, float] | None = None
        self.cores: float | None = None

    def start(self) -> None:
        self._start = (time.monotonic(), cpu_seconds(self.pids))

    def stop(self) -> None:
        if self._start is None:
            return
        wall, cpu = time.monotonic() - self._start[0], cpu_seconds(self.pids) - self._start[1]
        self.cores = cpu / wall if wall > 0 else None


# ---- the watcher -------------------------------------------------------------------------

@dataclass
class Watch:
    """What the watcher saw on the output topic, one entry per output, in arrival order."""

    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)  # CreateTime: when produce() ran
    arrivals: list[float] = field(default_factory=list)      # time.monotonic() at the watcher


def watch_output(bootstrap: str, topic: str, expected_keys: int, procs: list[subprocess.Popen],
                 meters: list[CpuMeter], partitions: int = 1,
                 timeout: float = SCENARIO_TIMEOUT_S,
                 ignore_key_prefix: bytes | None = None) -> Watch:
    """Read ``topic`` from the start by assignment (no group: no join delay) until outputs
    with ``expected_keys`` distinct keys arrived; the meters run from the first output to
    the last. Outputs are kept, and checked once the run is over. Outputs whose key starts
    with ``ignore_key_prefix`` (readiness probes) are passed over."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": fresh_name("watcher"),
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    w = Watch()
    seen: set[bytes | None] = set()
    errors: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < expected_keys:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(seen)}/{expected_keys} outputs after "
                                   f"{timeout:.0f} s; watcher errors: {errors or 'none'}")
            exited = [p for p in procs if p.poll() is not None]
            batch = consumer.consume(500, 2.0 if exited else 0.2)
            now = time.monotonic()
            good = [m for m in batch if m.error() is None]
            for m in batch:
                if m.error() is not None:
                    errors[m.error().str()] = errors.get(m.error().str(), 0) + 1
            if ignore_key_prefix is not None:
                good = [m for m in good if not (m.key() or b"").startswith(ignore_key_prefix)]
            if exited and not good:
                raise RuntimeError(f"a process under test exited with {exited[0].returncode} "
                                   f"after {len(seen)}/{expected_keys} outputs")
            if good and not w.arrivals:
                for meter in meters:
                    meter.start()
            for m in good:
                kind, ts = m.timestamp()
                key = m.key()
                seen.add(key)
                w.keys.append(key)
                w.values.append(m.value())
                w.timestamps_ms.append(ts if kind == TIMESTAMP_CREATE_TIME else -1)
                w.arrivals.append(now)
        for meter in meters:
            meter.stop()
    finally:
        consumer.close()
    return w


# ---- results -----------------------------------------------------------------------------

@dataclass
class Result:
    """One run of one row."""

    records: int          # outputs counted: those after the first arrival
    seconds: float        # last arrival - first arrival
    input_bytes: float    # input bytes of the counted records
    cpu: float | None = None         # cores used by the processes under test meanwhile
    broker_cpu: float | None = None  # cores used by the broker meanwhile
    latencies_ms: list[float] = field(default_factory=list)  # REST rows: per request
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("nan")

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / self.seconds / 1e6 if self.seconds > 0 else float("nan")


def rate_window(arrivals: list[float]) -> tuple[int, float]:
    """(outputs after the first arrival, last arrival - first arrival): the one definition."""
    if not arrivals:
        raise RuntimeError("no outputs")
    first = arrivals[0]
    counted = sum(1 for t in arrivals if t > first)
    seconds = arrivals[-1] - first
    if counted == 0 or seconds <= 0:
        raise RuntimeError(f"all {len(arrivals)} outputs arrived at once; use more records")
    return counted, seconds


def result_from_watch(w: Watch, avg_input_bytes: float, meters: list[CpuMeter],
                      broker_meter: CpuMeter | None, stamped_by_loop: bool = True) -> Result:
    """The row's rate from output arrivals, with the CreateTime cross-check as a note when
    the loop under test stamped its outputs (``stamped_by_loop``)."""
    counted, seconds = rate_window(w.arrivals)
    result = Result(counted, seconds, counted * avg_input_bytes,
                    cpu=_sum_cores(meters), broker_cpu=broker_meter.cores if broker_meter else None)
    stamps = sorted(t for t in w.timestamps_ms if t >= 0)
    if stamped_by_loop and len(stamps) > 1 and stamps[-1] > stamps[0]:
        after = sum(1 for t in stamps if t > stamps[0])
        result.notes.append(f"produce() timestamps: {after / ((stamps[-1] - stamps[0]) / 1000):,.0f}"
                            " rec/s")
    duplicates = len(w.keys) - len(set(w.keys))
    if duplicates:
        result.notes.append(f"{duplicates} duplicate outputs (redelivered after a rebalance)")
    return result


def _sum_cores(meters: list[CpuMeter]) -> float | None:
    cores = [m.cores for m in meters if m.cores is not None]
    return sum(cores) if cores else None


def check_outputs(w: Watch, records: list[dict], expect: Callable[[dict, dict], str | None],
                  decode: Callable[[bytes], dict] = json.loads) -> None:
    """Every input (``records[i]`` was sent with key ``i``) has an output and every output
    is right: ``expect(input record, decoded output)`` returns what is wrong, or None.
    Raises on the first wrong output."""
    by_key = {str(i).encode(): record for i, record in enumerate(records)}
    missing = set(by_key) - set(w.keys)
    if missing:
        raise RuntimeError(f"{len(missing)} inputs have no output (e.g. key {min(missing)!r})")
    for key, value in zip(w.keys, w.values):
        if key not in by_key:
            raise RuntimeError(f"an output has key {key!r}, which no input has")
        problem = expect(by_key[key], decode(value))
        if problem:
            raise RuntimeError(f"wrong output for key {key.decode()}: {problem}")


def same_record(extra_field: bool) -> Callable[[dict, dict], str | None]:
    """``expect`` for JSON rows: the input's fields unchanged, plus the extra field if asked."""
    def expect(record: dict, output: dict) -> str | None:
        wanted = add_field(dict(record)) if extra_field else record
        if output != wanted:
            diff = sorted(k for k in set(wanted) | set(output) if wanted.get(k) != output.get(k))
            return f"fields {diff[:5]} differ"
        return None
    return expect


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a process this script started, by its PID (its process group when it leads
    one, so a supervisor's children stop too), if it is still running."""
    if proc.poll() is not None:
        return
    _signal(proc, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL)
        proc.wait(10)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def median_run(runs: list[Result]) -> tuple[Result, float, float]:
    """The run with the median rate, and the lowest and highest rate of all runs."""
    ordered = sorted(runs, key=lambda r: r.rate)
    return ordered[(len(ordered) - 1) // 2], ordered[0].rate, ordered[-1].rate


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def parse_stream_logs(path: Path) -> tuple[dict[str, int], float | None]:
    """The stop lines' counts summed over the processes, and the median rate of the 1 s
    stats lines while busy (one process's)."""
    counts: dict[str, int] = {}
    rates = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # librdkafka's own log lines
        if not isinstance(entry, dict):
            continue
        if entry.get("event") == "stop":
            for k in ("in", "out", "dropped", "failed"):
                counts[k] = counts.get(k, 0) + int(entry.get(k) or 0)
        elif entry.get("event") == "stats" and entry.get("records_per_s", 0) > 0:
            rates.append(entry["records_per_s"])
    # The first and last busy intervals are partly idle: leave them out when there are more.
    busy = rates[1:-1] if len(rates) > 2 else rates
    return counts, (statistics.median(busy) if busy else None)
