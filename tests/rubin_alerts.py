"""Rubin alerts as Rubin sends them: the published schemas and sample alerts of the
``lsst-alert-packet`` package, varied, in the Confluent wire format (byte 0, a schema id,
one schemaless record). Shared by the tests and benchmarks/rubin_columns.py."""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

import fastavro

SCHEMA_ID = 1100  # the id the tests' registry serves lsst.v11 under
# A Fink-style contract on Rubin alerts: seven declared fields (diaSource and prvDiaSources
# share one named record, so the message decoder reads each with the fields of both)
RUBIN_FIELDS = ["diaSourceId", "diaSource.psfFlux", "diaSource.psfFluxErr",
                "diaSource.midpointMjdTai", "diaSource.band", "prvDiaSources.psfFlux",
                "prvDiaSources.midpointMjdTai"]
CUTOUTS = ("cutoutDifference", "cutoutScience", "cutoutTemplate")


def sample(version: str = "11/0") -> tuple[dict, dict]:
    """The writer schema and the sample alert of an ``lsst.v<major>_<minor>`` version."""
    import lsst.alert.packet

    path = Path(lsst.alert.packet.__file__).parent / "schema" / version / "sample_data" / \
        "fakeAlert.avro"
    with open(path, "rb") as f:
        reader = fastavro.reader(f)
        return reader.writer_schema, next(reader)


def alerts(n: int, version: str = "11/0", cutout_bytes: int = 0, seed: int = 36
           ) -> tuple[dict, list[dict]]:
    """``n`` alerts varied from the sample: ids, fluxes, times, the number of previous
    sources (0-30), and, with ``cutout_bytes``, three cutouts of that size each (Rubin's
    FITS stamps are a few tens of kB)."""
    schema, base = sample(version)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        alert = dict(base, diaSourceId=base["diaSourceId"] + i)
        source = dict(base["diaSource"], diaSourceId=alert["diaSourceId"],
                      psfFlux=rng.uniform(100, 5000), midpointMjdTai=60900 + rng.random())
        alert["diaSource"] = source
        prv = (base["prvDiaSources"] or [source])[0]
        alert["prvDiaSources"] = [dict(prv, psfFlux=rng.uniform(100, 5000),
                                       midpointMjdTai=60800 + k + rng.random())
                                  for k in range(rng.randrange(31))] or None
        if cutout_bytes:
            for name in CUTOUTS:
                alert[name] = rng.randbytes(cutout_bytes)
        out.append(alert)
    return schema, out


def framed(schema: dict, records: list[dict], schema_id: int = SCHEMA_ID) -> list[bytes]:
    """Each record as a Confluent-framed message of ``schema_id``."""
    parsed = fastavro.parse_schema(schema)
    out = []
    for record in records:
        buf = io.BytesIO()
        buf.write(struct.pack(">bI", 0, schema_id))
        fastavro.schemaless_writer(buf, parsed, record)
        out.append(buf.getvalue())
    return out
