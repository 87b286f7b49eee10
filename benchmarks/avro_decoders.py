"""What an Avro alert costs to decode, and what declaring the input fields saves.

The real ZTF alerts of ``../shared/data/ztf/`` (two schema versions, cutouts included) are
replicated to ``--alerts`` container messages, as ZTF and Fink publish them, and decoded in
this process. CPU time (``time.process_time``) per alert, best of ``--repeat``, and alerts/s
per core; "x d0" compares with fastavro's full decode of the same messages (d0) in the same
run. The declared fields are ``INPUT_FIELDS`` of examples/fink_contract/preprocessing.py.

d0  fastavro.reader, the whole container message: the full-decode ceiling of the issue
d1  MessageDecoder as before declared fields: cutouts stepped over (SKIP_CUTOUTS)
d2  MessageDecoder with the declared fields: fastavro's schema resolution against a reader
    schema of just them (what run, stream and Spark use)
b*  the record body alone (no container framing): fastavro whole / projected, and cavro
    (Cython; not a dependency: measured when installed) whole / projected
f1  read_records on each message as a one-alert file (a ZTF archive, as run and Spark read
    it): the file's reader is kept per schema text and declared fields
p*  the ColumnReader (polars-avro, the columnar extra): the containers of a batch of 500 read
    in one call, handed back as records (p1) or as one Arrow table (p2)
c*  decode + Preprocessor with the Fink contract function: what the stream's CPU does per
    alert before encoding and producing, without and with the declared fields; c2 the
    columnar contract (batch_format="arrow") with a function that reads one column: the
    decoded dicts made into an Arrow table per batch; c3/c4 the same over the ColumnReader

    python benchmarks/avro_decoders.py                 # 20,000 alerts
    python benchmarks/avro_decoders.py --alerts 2000
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

import fastavro

ROOT = Path(__file__).resolve().parent.parent
ALERTS_DIR = ROOT.parent / "shared" / "data" / "ztf"
EXAMPLE = ROOT / "examples" / "fink_contract" / "preprocessing.py"
CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


def load_example():
    spec = importlib.util.spec_from_file_location("fink_contract_preprocessing", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def replicate(n: int, seed: int = 7) -> list[tuple[dict, dict]]:
    """``n`` (writer schema, alert) pairs from the real alerts, cutouts kept."""
    originals = []
    for path in sorted(ALERTS_DIR.glob("*.avro")):
        with open(path, "rb") as f:
            reader = fastavro.reader(f)
            originals.append((reader.writer_schema, next(reader)))
    rng = random.Random(seed)
    out = []
    for i in range(n):
        schema, alert = originals[i % len(originals)]
        alert = {**alert, "candid": alert["candid"] + i, "candidate": {
            **alert["candidate"], "magpsf": alert["candidate"]["magpsf"] + rng.uniform(-2, 2)}}
        out.append((schema, alert))
    return out


def messages(pairs: list[tuple[dict, dict]]) -> list[bytes]:
    parsed: dict[int, dict] = {}
    values = []
    for schema, alert in pairs:
        buf = io.BytesIO()
        fastavro.writer(buf, parsed.setdefault(id(schema), fastavro.parse_schema(schema)),
                        [alert])
        values.append(buf.getvalue())
    return values


def bodies(pairs: list[tuple[dict, dict]]) -> list[tuple[int, bytes]]:
    """(schema version, schemaless record bytes) per alert."""
    versions: dict[int, int] = {}
    parsed: dict[int, dict] = {}
    out = []
    for schema, alert in pairs:
        version = versions.setdefault(id(schema), len(versions))
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed.setdefault(id(schema),
                                                          fastavro.parse_schema(schema)), alert)
        out.append((version, buf.getvalue()))
    return out


def cpu_per_item(work: Callable[[], int], repeat: int) -> float:
    """Best CPU seconds per item of ``work`` (which returns how many items it did)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        n = work()
        best = min(best, (time.process_time() - started) / n)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alerts", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from mlflow_preproc.runtime.formats import MessageDecoder, read_records
    from mlflow_preproc.runtime.input_fields import parse, reader_schema
    from mlflow_preproc.runtime.records import Preprocessor

    fink = load_example()
    tree = parse(fink.INPUT_FIELDS)
    pairs = replicate(args.alerts)
    values = messages(pairs)
    schemas = list({id(s): s for s, _ in pairs}.values())
    raw_bodies = bodies(pairs)
    writers = [fastavro.parse_schema(s) for s in schemas]
    readers = [fastavro.parse_schema(reader_schema(s, tree)) for s in schemas]

    def container_decode(decoder) -> Callable[[], int]:
        return lambda: sum(len(decoder.decode(v)) for v in values)

    def fastavro_containers() -> int:
        return sum(1 for v in values for _ in fastavro.reader(io.BytesIO(v)))

    def fastavro_bodies(projected: bool) -> Callable[[], int]:
        def work() -> int:
            for version, body in raw_bodies:
                fastavro.schemaless_reader(io.BytesIO(body), writers[version],
                                           readers[version] if projected else None)
            return len(raw_bodies)
        return work

    rows: list[tuple[str, str, float]] = []
    rows.append(("d0", "fastavro.reader, whole message", cpu_per_item(fastavro_containers,
                                                                    args.repeat)))
    today = MessageDecoder("avro", skip=CUTOUTS)
    declared = MessageDecoder("avro", skip=CUTOUTS, fields=tree)
    rows.append(("d1", "MessageDecoder, cutouts skipped (before)",
                 cpu_per_item(container_decode(today), args.repeat)))
    rows.append(("d2", "MessageDecoder, declared fields",
                 cpu_per_item(container_decode(declared), args.repeat)))
    rows.append(("f1", "read_records, one-alert files, declared fields",
                 cpu_per_item(lambda: sum(len(list(read_records(io.BytesIO(v), "avro", "f",
                                                                fields=tree)))
                                          for v in values), args.repeat)))
    rows.append(("b0", "fastavro schemaless, whole body", cpu_per_item(fastavro_bodies(False),
                                                                      args.repeat)))
    rows.append(("b1", "fastavro schemaless, declared fields",
                 cpu_per_item(fastavro_bodies(True), args.repeat)))
    try:
        import cavro

        whole = [cavro.Schema(s, cavro.PERMISSIVE_OPTIONS) for s in schemas]
        projected = [cavro.Schema(reader_schema(s, tree), cavro.PERMISSIVE_OPTIONS).reader_for_writer(w)
                     for s, w in zip(schemas, whole)]

        def cavro_bodies(decoders) -> Callable[[], int]:
            def work() -> int:
                for version, body in raw_bodies:
                    decoders[version].binary_decode(body)
                return len(raw_bodies)
            return work

        rows.append(("b2", "cavro 1.0, whole body", cpu_per_item(cavro_bodies(whole),
                                                                args.repeat)))
        rows.append(("b3", "cavro 1.0, declared fields",
                     cpu_per_item(cavro_bodies(projected), args.repeat)))
    except ImportError:
        rows.append(("b2", "cavro: not installed (pip install cavro)", float("nan")))

    plain = Preprocessor(fink.pre_processing, None, fink.FEATURE_NAMES)
    with_fields = Preprocessor(fink.pre_processing, None, fink.FEATURE_NAMES, fink.INPUT_FIELDS)

    def contract(decoder, preprocessor) -> Callable[[], int]:
        def work() -> int:
            for start in range(0, len(values), 500):
                batch = [r for v in values[start:start + 500] for r in decoder.decode(v)]
                preprocessor.process_each(batch)
            return len(values)
        return work

    rows.append(("c0", "decode + Fink function, no declaration",
                 cpu_per_item(contract(today, plain), args.repeat)))
    rows.append(("c1", "decode + Fink function, INPUT_FIELDS",
                 cpu_per_item(contract(declared, with_fields), args.repeat)))
    import pyarrow.compute as pc

    def one_column(table):  # the least a columnar function does: read one column
        return pc.struct_field(table.column("candidate"), "magpsf")

    columns = Preprocessor(one_column, "arrow", None, fink.INPUT_FIELDS)
    rows.append(("c2", "decode + batch_format='arrow' (Table from dicts), INPUT_FIELDS",
                 cpu_per_item(contract(declared, columns), args.repeat)))

    from mlflow_preproc.runtime import avro_columns

    if avro_columns.installed():
        reader = avro_columns.ColumnReader(tree, CUTOUTS)
        reader.records(values[:10])  # the plans of both schema versions, once per stream

        def column_batches(read) -> Callable[[], int]:
            def work() -> int:
                for start in range(0, len(values), 500):
                    read(values[start:start + 500])
                return len(values)
            return work

        rows.append(("p1", "ColumnReader (polars-avro) -> records, declared fields",
                     cpu_per_item(column_batches(reader.records), args.repeat)))
        rows.append(("p2", "ColumnReader (polars-avro) -> Arrow table, declared fields",
                     cpu_per_item(column_batches(reader.table), args.repeat)))
        rows.append(("c3", "p1 + Fink function, INPUT_FIELDS (the stream's records path)",
                     cpu_per_item(column_batches(lambda batch: with_fields.process_each(
                         [r for rs in reader.records(batch) for r in rs])), args.repeat)))
        rows.append(("c4", "p2 + batch_format='arrow', INPUT_FIELDS (the stream's columnar "
                           "path)", cpu_per_item(column_batches(
                               lambda batch: columns.process_columns(reader.table(batch)[0])),
                               args.repeat)))
    else:
        rows.append(("p1", "polars-avro: not installed (pip install .[columnar])",
                     float("nan")))

    d0 = rows[0][2]
    print(f"# {args.alerts} ZTF alert messages (2 schema versions, cutouts in the bytes), "
          f"{platform.python_implementation()} {platform.python_version()}, fastavro "
          f"{fastavro.__version__}, best of {args.repeat}; CPU time per alert")
    print(f"| row | what | µs CPU / alert | alerts/s per core | x d0 |")
    print("|---|---|---:|---:|---:|")
    for key, what, seconds in rows:
        if seconds != seconds:  # NaN: not measured
            print(f"| {key} | {what} | - | - | - |")
            continue
        print(f"| {key} | {what} | {seconds * 1e6:.0f} | {1 / seconds:,.0f} | "
              f"{d0 / seconds:.2f} |")
    print(json.dumps({"fields": fink.INPUT_FIELDS}))


if __name__ == "__main__":
    main()
