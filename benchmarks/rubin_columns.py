"""The column reader in every mode (#36): CPU per alert on Rubin and ZTF alerts, one table.

Rubin: ``lsst.v11_0`` alerts varied from the sample of ``lsst-alert-packet`` (a test extra),
three 16 kB cutouts each, in the Confluent wire format (byte 0, a schema id, the record) as
Rubin sends them; a Fink-style contract of 7 declared fields (tests/rubin_alerts.py).
ZTF: the real alerts of ``../shared/data/ztf`` replicated (tests/ztf_archive.py, real
cutouts), one Avro container per message or file; the Fink contract of
``examples/fink_contract/preprocessing.py`` (its ``INPUT_FIELDS``).

Rows, each CPU time of this process (``time.process_time``) over every alert, in one run:

(d0)      fastavro decoding each message whole, nothing else: the full-decode ceiling.
stream    the stream's data path without Kafka: decode a batch of 500 messages, the contract
          over the records (``Preprocessor.process_each``), each output encoded to JSON; the
          messages decoded one by one by fastavro (``AVRO_COLUMNS=false``) or by the column
          reader. Kafka's client adds ~10-20 µs an alert (benchmarks/README.md, Streams).
run       ``batch_run.run`` (what ``mlflow-preproc run`` calls) on a container file, on a
          folder of one-alert files, and on a Parquet file of the same alerts, to JSON Lines.
spark     ``mlflow-preproc run --engine spark --master local[2]`` on the ZTF one-alert files,
          wall time x 2 cores (the JVM escapes the children's CPU accounting), start-up
          (the same command on one alert) subtracted (``--spark``).

Every columnar row's outputs are checked equal, record by record, to the fastavro row's.

    python benchmarks/rubin_columns.py                 # 5,000 alerts of each
    python benchmarks/rubin_columns.py --alerts 1000 --spark
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fastavro
import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from rubin_alerts import RUBIN_FIELDS, alerts, framed  # noqa: E402
from ztf_archive import write_archive  # noqa: E402

from mlflow_preproc.runtime import batch_run  # noqa: E402
from mlflow_preproc.runtime.avro_columns import ColumnReader  # noqa: E402
from mlflow_preproc.runtime.formats import MessageDecoder  # noqa: E402
from mlflow_preproc.runtime.input_fields import parse  # noqa: E402
from mlflow_preproc.runtime.records import Preprocessor  # noqa: E402

BATCH = 500
NAN = float("nan")


def rubin_features(alert: dict) -> list[float]:
    """A Fink-style contract on Rubin alerts: the source, its band, the history's fluxes."""
    source = alert["diaSource"]
    history = [p["psfFlux"] for p in alert["prvDiaSources"] or [] if p["psfFlux"] is not None]
    mean = sum(history) / len(history) if history else NAN
    return [source["psfFlux"], source["psfFluxErr"], source["midpointMjdTai"],
            float(source["band"] == "r"), float(len(history)), mean,
            source["psfFlux"] - mean if history else NAN]


def load_fink():
    spec = importlib.util.spec_from_file_location(
        "fink_contract_preprocessing", ROOT / "examples" / "fink_contract" / "preprocessing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu(call) -> tuple[float, object]:
    start = time.process_time()
    result = call()
    return time.process_time() - start, result


def stream_path(messages, decoder, columns, preprocessor):
    """The stream's data path without Kafka: outputs as JSON, in message order."""
    out = []
    for at in range(0, len(messages), BATCH):
        batch = messages[at:at + BATCH]
        read = columns.records(batch) if columns is not None else [None] * len(batch)
        records = []
        for value, got in zip(batch, read):
            records += got if got is not None else decoder.decode(value)
        out += [orjson.dumps(o, option=orjson.OPT_SERIALIZE_NUMPY)
                for result in preprocessor.process_each(records) for o in result]
    return out


def run_path(preprocessor, inputs, columns: bool) -> bytes:
    out = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        batch_run.run(preprocessor, inputs, out, rejects_path=f"{tmp}/rejects.jsonl",
                      avro_columns=columns)
    return out.getvalue()


def parquet_of(records: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=BATCH * 2)


def rows_for(name, n, messages, full_decode, fmt, decoder_kw, fields, fn, tmp: Path,
             container_file: Path, small_files: list[str] | None, records: list[dict]):
    table = []
    t, _ = cpu(lambda: [full_decode(m) for m in messages])
    d0 = t / n
    table.append((f"{name} (d0) fastavro, whole message", t / n, d0))
    pre = Preprocessor(fn, input_fields=fields, feature_names=None)
    decoder = MessageDecoder(fmt, fields=parse(fields), **decoder_kw)
    t_fa, out_fa = cpu(lambda: stream_path(messages, decoder, None, pre))
    table.append((f"{name} stream {fmt}, fastavro, declared fields", t_fa / n, d0))
    by_id = decoder.writer_schema if fmt == "confluent-avro" else None
    columns = ColumnReader(decoder.fields, (), schema_by_id=by_id)
    stream_path(messages[:BATCH], decoder, columns, pre)  # warm: plans, the reading thread
    t_col, out_col = cpu(lambda: stream_path(messages, decoder, columns, pre))
    assert out_col == out_fa, f"{name}: the column reader's outputs differ"
    table.append((f"{name} stream {fmt}, column reader, declared fields", t_col / n, d0))
    for label, inputs in (("a container file", [str(container_file)]),
                          ("one-alert files", small_files)):
        if not inputs:
            continue
        t_fa, out_fa = cpu(lambda: run_path(pre, inputs, False))
        table.append((f"{name} run, {label}, fastavro", t_fa / n, d0))
        t_col, out_col = cpu(lambda: run_path(pre, inputs, True))
        assert out_col == out_fa, f"{name}: run's outputs differ with the column reader"
        table.append((f"{name} run, {label}, column reader", t_col / n, d0))
    pq_path = tmp / f"{name}.parquet"
    parquet_of(records, pq_path)
    t, out_pq = cpu(lambda: run_path(pre, [str(pq_path)], True))
    table.append((f"{name} run, a Parquet file", t / n, d0))
    return table


def spark_row(model_uri: str, archive: Path, one: Path, n: int, tmp: Path, d0: float):
    """Spark's row: wall time x 2 cores (an upper bound of its CPU: the JVM that pyspark
    starts is not waited for, so the children's rusage misses it), start-up subtracted."""
    def wall(path: Path, out: str) -> float:
        start = time.monotonic()
        proc = subprocess.run([str(Path(sys.executable).parent / "mlflow-preproc"), "run", "-m",
                               model_uri, str(path), "-o", str(tmp / out), "--engine", "spark",
                               "--master", "local[2]"], capture_output=True)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        return time.monotonic() - start

    startup = wall(one, "spark-one")
    total = wall(archive, "spark-all")
    return ("ZTF run --engine spark local[2], one-alert files (wall x 2 cores)",
            2 * (total - startup) / n, d0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=5000)
    parser.add_argument("--spark", action="store_true", help="add the Spark row (slow)")
    args = parser.parse_args()
    n = args.alerts
    tmp = Path(tempfile.mkdtemp(prefix="rubin-columns-"))
    table = _Table()

    # Rubin: lsst.v11_0, Confluent-framed, schema id 1100 from AVRO_SCHEMA_DIR (a registry
    # answers once per schema id: the same)
    schema, rubin = alerts(n, "11/0", cutout_bytes=16 * 1024)
    messages = framed(schema, rubin)
    (tmp / "schemas").mkdir()
    (tmp / "schemas" / "1100.avsc").write_bytes(orjson.dumps(schema))
    parsed = fastavro.parse_schema(schema)
    container = tmp / "rubin.avro"
    with open(container, "wb") as f:
        fastavro.writer(f, parsed, rubin)
    table += rows_for("Rubin", n, messages,
                      lambda m: fastavro.schemaless_reader(io.BytesIO(m[5:]), parsed, None),
                      "confluent-avro", {"schema_dir": str(tmp / "schemas")}, RUBIN_FIELDS,
                      rubin_features, tmp, container, None, rubin)

    # ZTF: one container per message; a container file of n; n one-alert files
    fink = load_fink()
    [one_block] = write_archive(tmp / "ztf-one-block", n, n)
    small = [str(p) for p in write_archive(tmp / "ztf-small", n, 1)]
    ztf_messages = [Path(p).read_bytes() for p in small]
    with open(one_block, "rb") as f:
        reader = fastavro.reader(f)
        ztf = list(reader)
    # an archive file as fastavro writes one: a block per ~16 kB, here an alert a block
    big = tmp / "ztf.avro"
    with open(big, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(reader.writer_schema), ztf)
    one_block.unlink()
    table += rows_for("ZTF", n, ztf_messages,
                      lambda m: next(fastavro.reader(io.BytesIO(m))), "avro", {},
                      fink.INPUT_FIELDS, fink.pre_processing, tmp, big, small,
                      [{k: v for k, v in a.items() if not k.startswith("cutout")} for a in ztf])
    if args.spark:
        import mlflow

        import mlflow_preproc  # noqa: F401 -- mlflow.preproc

        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        with mlflow.start_run():
            uri = mlflow.preproc.log_model(fink.pre_processing, name="fink",
                                           input_fields=fink.INPUT_FIELDS,
                                           feature_names=fink.FEATURE_NAMES).model_uri
        [one] = write_archive(tmp / "ztf-one", 1, 1)
        # the folder of one-alert files: a file is Spark's unit of work (binaryFile), and one
        # file of thousands of alerts is one task holding it whole (it fails past the JVM's
        # memory; docs/guides/spark.md)
        table.append(spark_row(uri, tmp / "ztf-small", one, n, tmp, table[-7][2]))



class _Table(list):
    """The rows, each printed as it is measured (a long run shows its progress)."""

    def __init__(self):
        super().__init__()
        print(f"{platform.python_version()}, {os.cpu_count()} cores; CPU of this process")
        print("| row | µs CPU / alert | alerts/s per core | x d0 |")
        print("|---|---:|---:|---:|", flush=True)

    def append(self, row) -> None:
        super().append(row)
        label, seconds, d0 = row
        print(f"| {label} | {seconds * 1e6:,.0f} | {1 / seconds:,.0f} | {d0 / seconds:.2f} |"
              if seconds > 0 and not math.isnan(seconds) else f"| {label} | - | - | - |",
              flush=True)

    def __iadd__(self, rows):
        for row in rows:
            self.append(row)
        return self


if __name__ == "__main__":
    main()
