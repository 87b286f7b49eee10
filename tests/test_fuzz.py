"""Fuzzing the decoders and the file readers with damaged real ZTF alerts (fast, no servers).

Every input ends as records, a reject or a dead letter: ``MessageDecoder.decode`` returns
records or raises :class:`DecodeError` (which the stream dead-letters), ``read_records``
yields records and :class:`DecodeError` items and never raises. Never a crash, a hang or a
record lost without a reject (but an Avro file cut exactly between two blocks is a valid,
shorter file: nothing can tell). Damage: truncations, bit flips, both, in containers of every
codec fastavro writes with the standard library (null, deflate, bzip2, xz). Examples that
once failed are kept as ``@example`` cases; the search is derandomized, so CI is reproducible.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal

import fastavro
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import DATA
from mlflow_preproc.config import ZTF_CUTOUTS
from mlflow_preproc.runtime.formats import DecodeError, MessageDecoder, drop_fields, read_records

PACKETS = sorted(DATA.glob("*.avro"))
CODECS = ("null", "deflate", "bzip2", "xz")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _container(codec: str, n: int = 2) -> bytes:
    """``n`` alerts of the first real packet, one block each, in a container of ``codec``."""
    with open(PACKETS[0], "rb") as f:
        reader = fastavro.reader(f)
        schema, alert = reader.writer_schema, next(reader)
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [dict(alert, candid=alert["candid"] + i) for i in range(n)],
                    codec=codec, sync_interval=1)
    return buf.getvalue()


CONTAINERS = {codec: _container(codec) for codec in CODECS}
CONTAINERS["packet"] = PACKETS[1].read_bytes()  # a real packet as ZTF sent it


def _header_end(data: bytes) -> int:
    """Where the first block starts: the bytes framing it are the ones worth hitting."""
    with contextlib.suppress(Exception):
        buf = io.BytesIO(data)
        fastavro.reader(buf)
        return buf.tell()
    return 0


@st.composite
def damaged(draw, sources: dict[str, bytes]) -> tuple[str, bytes]:
    """A source cut short, with bits flipped, or both; flips often near block framing."""
    name = draw(st.sampled_from(sorted(sources)))
    data = bytearray(sources[name])
    start = _header_end(bytes(data))
    near_framing = st.integers(max(0, start - 20), min(len(data) - 1, start + 24))
    anywhere = st.integers(0, len(data) - 1)
    for pos in draw(st.lists(st.one_of(near_framing, anywhere), max_size=4)):
        data[pos] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return name, bytes(data)


@contextlib.contextmanager
def no_hang(seconds: float = 10.0):
    """Fail, rather than hang the suite, if the body runs longer than ``seconds``."""
    def hung(*_):
        raise TimeoutError(f"the decoder ran for more than {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _decode_message(decoder: MessageDecoder, value: bytes) -> list | DecodeError:
    with no_hang():
        try:
            records = decoder.decode(value)
        except DecodeError as exc:
            return exc
    assert isinstance(records, list) and all(isinstance(r, dict) for r in records)
    return records


@pytest.mark.parametrize("skip", [(), ZTF_CUTOUTS], ids=["whole", "skipping-cutouts"])
@FUZZ
@given(case=damaged(CONTAINERS))
def test_a_damaged_avro_message_decodes_or_is_a_decode_error(skip, case):
    name, value = case
    decoder = MessageDecoder("avro", skip=skip, max_decoded_bytes=1 << 20)
    first = _decode_message(decoder, value)
    # The decoder keeps schemas and headers: the same bytes give the same verdict again.
    again = _decode_message(decoder, value)
    assert type(first) is type(again)
    if value == CONTAINERS[name]:  # undamaged: what fastavro reads
        assert first == [drop_fields(r, skip) for r in fastavro.reader(io.BytesIO(value))]


@FUZZ
@given(case=damaged(CONTAINERS))
def test_a_damaged_avro_file_gives_records_and_rejects_and_never_raises(case):
    name, data = case
    with no_hang():
        items = list(read_records(io.BufferedReader(io.BytesIO(data)), "avro", "in.avro",
                                  max_decoded_bytes=1 << 20))
    assert items, "an input that gave neither records nor a reject"
    assert all(isinstance(i, (dict, DecodeError)) for i in items)
    # Damaged framing ends the file with one reject; a block over the bound or with corrupt
    # records in it is one reject, and reading goes on with the next block.
    for item in items[:-1]:
        assert isinstance(item, dict) or "MAX_DECODED_BYTES" in str(item) \
            or "the next blocks are read" in str(item), str(item)
    if data == CONTAINERS[name]:
        assert all(isinstance(i, dict) for i in items)


def _schemaless_alert() -> tuple[dict, bytes]:
    with open(PACKETS[0], "rb") as f:
        reader = fastavro.reader(f)
        schema, alert = reader.writer_schema, next(reader)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), alert)
    return schema, buf.getvalue()


SCHEMA, SCHEMALESS = _schemaless_alert()


@pytest.mark.parametrize("skip", [(), ZTF_CUTOUTS], ids=["whole", "skipping-cutouts"])
@FUZZ
@given(case=damaged({"schemaless": SCHEMALESS}))
def test_a_damaged_schemaless_avro_message_decodes_or_is_a_decode_error(skip, case):
    _decode_message(MessageDecoder("avro", SCHEMA, skip=skip), case[1])


def _alert_lines() -> list[bytes]:
    """Real alerts as JSON Lines: their candidate fields, one object per line."""
    lines = []
    for packet in PACKETS:
        with open(packet, "rb") as f:
            alert = next(fastavro.reader(f))
        for i in range(3):
            record = {"objectId": alert["objectId"], "candid": alert["candid"] + i,
                      "candidate": {k: v for k, v in alert["candidate"].items()
                                    if not isinstance(v, bytes)}}
            lines.append(json.dumps(record).encode() + b"\n")
    return lines


LINES = _alert_lines()


@st.composite
def damaged_lines(draw) -> tuple[list[bytes], set[int]]:
    """The alert lines with some lines cut short or with bits flipped; which ones."""
    lines, hit = list(LINES), set()
    for index in draw(st.lists(st.integers(0, len(lines) - 1), max_size=3)):
        line = bytearray(lines[index])
        if draw(st.booleans()) or len(line) < 2:
            line = line[:draw(st.integers(0, len(line) - 1))] + b"\n"  # cut mid-line
        else:  # not its newline: that would join it to the next, intact, line
            line[draw(st.integers(0, len(line) - 2))] ^= 1 << draw(st.integers(0, 7))
        lines[index] = bytes(line)
        hit.add(index)
    return lines, hit


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@FUZZ
@given(case=damaged_lines())
@example(case=([LINES[0][:40] + b"\n", *LINES[1:]], {0}))  # cut inside "candidate": finding 5
# The first "{" flipped to "[": the input was read as one JSON array, and every line was lost.
@example(case=([b"[" + LINES[0][1:], *LINES[1:]], {0}))
def test_damaged_json_lines_lose_no_intact_line(fmt, case):
    lines, hit = case
    with no_hang():
        items = list(read_records(io.BufferedReader(io.BytesIO(b"".join(lines))), fmt, "in"))
    records = [i for i in items if isinstance(i, dict)]
    intact = [json.loads(line) for n, line in enumerate(lines) if n not in hit]
    for record in intact:
        assert record in records, f"an intact line was lost: {record['candid']}"
    # The damaged lines came out as records (a flipped digit is still JSON) or as rejects
    # holding their text; none vanished (an emptied line is no record, and no reject).
    rejects = [i for i in items if isinstance(i, DecodeError)]
    if any(lines[n].strip() for n in hit):
        assert len(items) > len(intact)
    assert all(r.raw for r in rejects)


@FUZZ
@given(cut=st.integers(1, sum(map(len, LINES))), flip=st.integers(0, 10**6),
       bit=st.integers(0, 7))
def test_a_damaged_json_array_gives_its_records_before_the_damage_and_never_raises(cut, flip,
                                                                                  bit):
    array = bytearray(b"[" + b",".join(line.strip() for line in LINES) + b"]")
    array[flip % len(array)] ^= 1 << bit
    with no_hang():
        items = list(read_records(io.BufferedReader(io.BytesIO(bytes(array[:cut]))), "json",
                                  "in"))
    assert items, "an input that gave neither records nor a reject"
    originals = [json.loads(line) for line in LINES]
    for item in items:
        assert isinstance(item, DecodeError) or item in originals or len(item) == 3
