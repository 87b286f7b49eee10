"""A generated archive of ZTF alerts, made from the two real packets in tests/data.

Each alert is a copy of a real one (its writer schema, 3.2 or 3.3, comes along) with a new
objectId and candid and jittered candidate values, so the archive has the real structure:
nested candidate, a prv_candidates history, three cutout stamps. Used by tests/test_spark_run.py
and benchmarks/spark_batch.py.
"""

from __future__ import annotations

import io
import random
import zlib
from pathlib import Path

import fastavro
import fastavro.schema

DATA = Path(__file__).parent / "data"


def real_alerts() -> list[tuple[dict, dict]]:
    """(writer schema, alert) of each real packet."""
    out = []
    for path in sorted(DATA.glob("*.avro")):
        with open(path, "rb") as f:
            reader = fastavro.reader(f)
            out.append((reader.writer_schema, next(reader)))
    return out


def write_archive(folder: Path, n_alerts: int, per_file: int, *, seed: int = 7,
                  stamp_bytes: int | None = None, deflate_every: int = 0) -> list[Path]:
    """Write ``n_alerts`` alerts as Avro containers of ``per_file`` alerts each.

    ``stamp_bytes`` cuts the cutout stamps to that many bytes (smaller archives for tests);
    every ``deflate_every``-th file is deflate-compressed (0: none).
    """
    folder.mkdir(parents=True, exist_ok=True)
    encoders = [_Encoder(schema, alert) for schema, alert in real_alerts()]
    rng = random.Random(seed)
    paths = []
    for file_no, start in enumerate(range(0, n_alerts, per_file)):
        encoder = encoders[file_no % len(encoders)]
        alerts = [_variant(encoder.template, start + i, rng, stamp_bytes)
                  for i in range(min(per_file, n_alerts - start))]
        path = folder / f"alerts-{file_no:05d}.avro"
        deflate = bool(deflate_every) and file_no % deflate_every == 0
        path.write_bytes(encoder.container([encoder.encode(a) for a in alerts], deflate))
        paths.append(path)
    return paths


class _Encoder:
    """Avro container bytes for alerts of one writer schema, fast.

    fastavro.writer spends ~3 ms per ZTF alert resolving the union of the light-curve
    history; the alerts of an archive share a few histories, so each field is encoded on its
    own and the encoded histories are reused. The bytes are what fastavro.writer writes.
    """

    def __init__(self, schema: dict, template: dict):
        self.schema, self.template = schema, template
        # Each field's type on its own, named types it refers to inlined.
        expanded = fastavro.schema.expand_schema(schema)
        self._fields = [(f["name"], fastavro.parse_schema(f["type"]))
                        for f in expanded["fields"]]
        self._cache: dict = {}

    def encode(self, alert: dict) -> bytes:
        out = []
        for name, schema in self._fields:
            value = alert.get(name)
            if name == "prv_candidates":  # cached by history length: shared histories
                key = (name, len(value or ()))
                if key not in self._cache:
                    self._cache[key] = _encode(schema, value)
                out.append(self._cache[key])
            else:
                out.append(_encode(schema, value))
        return b"".join(out)

    def container(self, records: list[bytes], deflate: bool) -> bytes:
        buf = io.BytesIO()
        sync = bytes(random.Random(len(records)).randrange(256) for _ in range(16))
        fastavro.writer(buf, self.schema, [], codec="deflate" if deflate else "null",
                        sync_marker=sync)
        data = b"".join(records)
        if deflate:
            compressor = zlib.compressobj(wbits=-15)  # raw deflate, as Avro specifies
            data = compressor.compress(data) + compressor.flush()
        buf.write(_encode("long", len(records)) + _encode("long", len(data)) + data + sync)
        return buf.getvalue()


def _encode(schema, value) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, value)
    return buf.getvalue()


def _variant(template: dict, i: int, rng: random.Random, stamp_bytes: int | None) -> dict:
    # Copies only what changes: the history entries and stamps are shared, not modified.
    alert = dict(template)
    alert["objectId"] = f"ZTF{18 + i % 6}a{i:07d}"
    alert["candid"] = template["candid"] + i
    c = alert["candidate"] = dict(template["candidate"])
    c["candid"] = alert["candid"]
    c["jd"] += i * 1e-4
    c["magpsf"] += rng.gauss(0, 0.5)
    c["rb"] = rng.random()
    c["fid"] = 1 + i % 3
    history = template.get("prv_candidates") or []
    alert["prv_candidates"] = history[: i % (len(history) + 1)] or None
    for key in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
        if stamp_bytes is not None and template.get(key):
            stamp = alert[key] = dict(template[key])
            stamp["stampData"] = stamp["stampData"][:stamp_bytes]
    return alert
