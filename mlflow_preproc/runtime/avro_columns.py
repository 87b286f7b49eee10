"""Avro messages decoded a batch at a time into columns, by polars-avro.

``pip install '.[columnar]'`` in the mlflow-preproc clone. Without it, or for any message this
module does not take, :class:`~mlflow_preproc.runtime.formats.MessageDecoder` decodes one
message at a time as before: this is an accelerator with the same results, never another meaning.

Why: fastavro builds a ZTF alert's ~3,000 values one Python object at a time, ~300 µs of CPU
even with declared input fields (benchmarks/README.md). polars-avro's compiled reader fills Arrow
columns instead, ~40 µs an alert, but it reads files, not messages. Alert streams send each alert
as a one-record container file, so the containers of a batch that share a writer schema are
joined into one (the header once, then every message's blocks, each ending with the header's
sync marker), read in one call, and the rows handed back to the message each came from.

Confluent-framed messages (``confluent-avro``: byte 0, a 4-byte schema id, one schemaless
record), the way Rubin sends its alerts and every stream behind a schema registry, are read the
same way: the record of each message of a schema id becomes a block of one record of a joined
file with the writer schema of that id (a block's body is records written back to back, and a
schemaless record is exactly one). One block per message, each closed by the sync marker, keeps
a damaged record from shifting its neighbours: its read fails (or overruns, below) instead of
handing the next message's bytes to another record. The writer schema comes from the message
decoder's registry lookup; a message whose schema cannot be had now (registry down, unknown id)
is left to the message decoder, which waits for the registry or dead-letters the message.

What comes here is read exactly as the message decoder reads it; the rest goes there:

- a message that is not an uncompressed container (codec ``null``; the compressed ones need the
  bounded inflation of the message decoder), whose framing is damaged, or whose blocks come to
  more than ``MAX_DECODED_BYTES``;
- a writer schema whose read part holds a type polars would hand back as another value (maps,
  enums, fixed, unions of two types or more, logical types);
- a group polars refuses (bytes damaged inside a record): it is halved until the messages at
  fault stand alone, and those go to the message decoder, which dead-letters them, alone;
- a group polars does not read within its time budget (:attr:`ColumnReader.BUDGET_S`, and a
  little more per message): polars-avro's reader loops for ever on a block holding bytes after
  its records (#32: one damaged alert stalled a stream for good, nothing raised), and Rust
  code cannot be interrupted. Reads run on a thread of their own; when one overruns, the
  reader stops taking messages (every one goes to the message decoder, which judges the
  damaged one) and :attr:`ColumnReader.stuck` says why, which fails the stream's ``/healthz``
  so that an orchestrator restarts it and frees the core the stuck thread spins on.

One difference is known, found by fuzzing (tests/test_avro_columns.py): a union index outside
its union, which only damage writes, is read by polars-avro as the null branch (or, for
``["null", T]``, as ``T``) where fastavro refuses the message. The value's bytes are the same
either way, so only that field of that record differs; set ``AVRO_COLUMNS=false`` where a
damaged union must be a dead letter.
"""

from __future__ import annotations

import io
import json
import queue
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import fastavro
from fastavro.schema import expand_schema

from mlflow_preproc.config import MAX_DECODED_BYTES_DEFAULT
from mlflow_preproc.runtime.avro_bounds import amplifies
from mlflow_preproc.runtime.formats import OCF_HEADER_SCHEMA, OCF_MAGIC, Record, zigzag
from mlflow_preproc.runtime.input_fields import Tree
from mlflow_preproc.runtime.input_fields import parse as parse_fields
from mlflow_preproc.runtime.input_fields import read_tree

try:
    import polars as pl
    import polars_avro
except ImportError:  # the columnar extra is not installed: the message decoder does it all
    pl = polars_avro = None

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_SYNC = b"mlflow-preproc\x00\x01"  # any 16 bytes: the joined file's own sync marker
_ONE_RECORD = b"\x02"  # a block's record count, 1, as an Avro long


def _long(n: int) -> bytes:
    """``n`` (>= 0) as an Avro long: zigzag, then 7 bits a byte."""
    n <<= 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def installed() -> bool:
    """Whether polars-avro (the ``columnar`` extra) can be imported."""
    return polars_avro is not None


class Unfaithful(ValueError):
    """A writer schema with a type polars would not hand back as the message decoder does."""


@dataclass
class _Group:
    """The messages of one batch that share a writer schema, framed for one read."""

    plan: _Plan
    indexes: list[int] = field(default_factory=list)  # positions in the batch
    counts: list[int] = field(default_factory=list)  # records of each
    blocks: list[list[Any]] = field(default_factory=list)  # each message's blocks and syncs

    def part(self, members: range) -> _Group:
        return _Group(self.plan, [self.indexes[i] for i in members],
                      [self.counts[i] for i in members], [self.blocks[i] for i in members])


class ColumnReader:
    """Decodes the Avro container messages of a batch into a polars DataFrame per writer schema.

    ``fields``: the declared input fields (only these are handed back); ``drop``: the
    ``DROP_FIELDS`` paths (with the cutouts when ``SKIP_CUTOUTS``), left out as the message
    decoder leaves them out; ``max_decoded_bytes``: ``MAX_DECODED_BYTES``; ``schema_by_id``:
    the writer schema of a Confluent schema id (``MessageDecoder.writer_schema``), for
    ``confluent-avro`` messages (without it only containers are read here).
    """

    _MAX_SCHEMAS = 64
    _RECENT_HEADERS = 4
    # A read of 500 ZTF alerts takes ~30 ms of CPU: the budget is for a reader that will
    # never return, not for a slow one (a machine under load, a cold start).
    BUDGET_S = 10.0
    BUDGET_PER_MESSAGE_S = 0.02

    def __init__(self, fields: Tree | None = None, drop: Collection[str] = (),
                 max_decoded_bytes: int = MAX_DECODED_BYTES_DEFAULT,
                 schema_by_id: Callable[[int], Any] | None = None):
        if polars_avro is None:
            raise RuntimeError("decoding Avro into columns needs polars-avro; pip install "
                               "'.[columnar]' in the mlflow-preproc clone")
        self.stuck: str | None = None  # why reads stopped: a read that never returned
        self._reads: queue.Queue | None = None
        self._fields = fields
        self._drop = parse_fields(list(drop)) or {}
        self._limit = max_decoded_bytes
        self._plans: dict[bytes, _Plan | None] = {}  # by schema text; None: not taken here
        # (header bytes before the sync marker, its plan) of the last few containers: a
        # stream's containers share them, so most messages need no header decoding.
        self._recent: list[tuple[bytes, _Plan | None]] = []
        self._schema_by_id = schema_by_id
        self._plans_by_id: dict[int, _Plan | None] = {}
        self._unavailable_ids: set[int] = set()
        self._file_headers: dict[bytes, bytes] = {}  # schema text -> a container header

    def records(self, values: Sequence[bytes | None]) -> list[list[Record] | None]:
        """Each message's records, or None for one the message decoder is to decode."""
        out: list[list[Record] | None] = [None] * len(values)
        for group, frame in self._read(values):
            rows = frame.to_dicts()
            at = 0
            for index, count in zip(group.indexes, group.counts):
                out[index] = rows[at:at + count]
                at += count
        return out

    def blocks(self, text: bytes, blocks: list[tuple[int, bytes]]
               ) -> list[list[Record] | None]:
        """The records of each decoded block of an Avro file of schema ``text`` (``read_records``'
        ``columns``), or None for one the file reader is to decode: each block is read as a
        one-block container, the blocks of a call at once."""
        header = self._file_headers.get(text)
        if header is None:
            out = io.BytesIO()
            fastavro.schemaless_writer(out, OCF_HEADER_SCHEMA, {
                "magic": OCF_MAGIC, "sync": _SYNC,
                "meta": {"avro.schema": text, "avro.codec": b"null"}})
            if len(self._file_headers) >= self._MAX_SCHEMAS:
                self._file_headers.clear()
            header = self._file_headers[text] = out.getvalue()
        return self.records([b"".join((header, _long(n), _long(len(data)), data, _SYNC))
                             for n, data in blocks])

    def table(self, values: Sequence[bytes | None]) -> tuple[Any, list[int]]:
        """A ``pyarrow.Table`` of the records read here, in message order, and the batch
        position of the message each row came from; (None, []) when none was read here.

        Groups of different writer schemas are joined column by column (a column a schema
        lacks is null, types widened); a group that cannot be joined is left to the message
        decoder."""
        frames, spans = [], []  # spans: (message index, first row in the frames joined, count)
        rows = 0
        for group, frame in self._read(values):
            if frames:
                try:
                    pl.concat([frames[0].head(0), frame.head(0)], how="diagonal_relaxed")
                except Exception:  # noqa: BLE001 -- types polars cannot reconcile
                    continue
            frames.append(frame)
            for index, count in zip(group.indexes, group.counts):
                spans.append((index, rows, count))
                rows += count
        if not frames:
            return None, []
        if len(frames) == 1:  # one writer schema: the rows are in message order already
            joined = frames[0]
        else:
            spans.sort()
            joined = pl.concat(frames, how="diagonal_relaxed")[
                [row for _, first, count in spans for row in range(first, first + count)]]
        owners = [index for index, _, count in spans for _ in range(count)]
        return joined.to_arrow(compat_level=pl.CompatLevel.oldest()), owners

    # ---- framing -------------------------------------------------------------------------

    def _read(self, values: Sequence[bytes | None]) -> list[tuple[_Group, Any]]:
        # a schema id the registry did not give is asked for once a batch: a registry that
        # is down or slow is the message decoder's to wait for, not every message's to ask
        self._unavailable_ids: set[int] = set()
        groups: dict[int, _Group] = {}
        for index, value in enumerate(values):
            framed = self._frame(value)
            if framed is not None:
                plan, blocks, count = framed
                group = groups.setdefault(id(plan), _Group(plan))
                group.indexes.append(index)
                group.counts.append(count)
                group.blocks.append(blocks)
        read: list[tuple[_Group, Any]] = []
        for group in groups.values():
            if self.stuck is not None:
                break
            read.extend(self._decoded_in_time(group))
        return read

    def _decoded_in_time(self, group: _Group) -> list[tuple[_Group, Any]]:
        """:func:`_decoded` on the reading thread, within the budget; nothing past it."""
        if self._reads is None:
            self._reads = queue.Queue()
            # A daemon thread: one stuck for ever must not keep the process from exiting.
            threading.Thread(target=_serve, args=(self._reads,), name="polars-avro",
                             daemon=True).start()
        answer: queue.Queue = queue.Queue(1)
        self._reads.put((group, answer))
        budget = self.BUDGET_S + self.BUDGET_PER_MESSAGE_S * len(group.indexes)
        try:
            outcome = answer.get(timeout=budget)
        except queue.Empty:
            self.stuck = (f"polars-avro did not read {len(group.indexes)} Avro message(s) "
                          f"within {budget:.0f} s (it loops for ever on some damaged "
                          "messages); every message is decoded by the message decoder from now "
                          "on. Restart the stream to free the CPU the stuck read spins on, or "
                          "set AVRO_COLUMNS=false")
            return []
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _frame(self, value: bytes | None) -> tuple[_Plan, list[Any], int] | None:
        """The plan, blocks and record count of a message taken here, else None."""
        if not value:
            return None
        if value[0] == 0 and self._schema_by_id is not None:
            return self._framed_record(value)
        if not value.startswith(OCF_MAGIC):
            return None
        known = next((h for h in self._recent if value.startswith(h[0])), None)
        if known is None:
            known = self._header(value)
            if known is None:
                return None
            self._recent = [known, *self._recent[:self._RECENT_HEADERS - 1]]
        prefix, plan = known
        if plan is None:
            return None
        pos = len(prefix) + 16
        sync = value[len(prefix):pos]
        view = memoryview(value)
        blocks, records, decoded = [], 0, 0
        try:
            while pos < len(value):
                start = pos
                count, pos = zigzag(value, pos)
                size, pos = zigzag(value, pos)
                end = pos + size
                decoded += size
                # What the message decoder refuses or bounds, it is to judge.
                if count < 0 or size < 0 or count > max(size, 1) or decoded > self._limit \
                        or value[end:end + 16] != sync:
                    return None
                blocks += (view[start:end], _SYNC)
                records += count
                pos = end + 16
        except EOFError:
            return None
        return plan, blocks, records

    def _framed_record(self, value: bytes) -> tuple[_Plan, list[Any], int] | None:
        """A Confluent-framed message as a block of one record, or None (the message decoder
        judges it: a short frame, a schema it cannot have now, one not taken here)."""
        if len(value) < 6:
            return None
        schema_id = int.from_bytes(value[1:5], "big")
        if schema_id not in self._plans_by_id:
            if schema_id in self._unavailable_ids:
                return None
            try:
                writer = self._schema_by_id(schema_id)
            except Exception:  # noqa: BLE001 -- registry down or id unknown: the decoder's
                self._unavailable_ids.add(schema_id)  # to wait for or dead-letter
                return None
            if len(self._plans_by_id) >= self._MAX_SCHEMAS:
                self._plans_by_id.clear()
            try:
                self._plans_by_id[schema_id] = _Plan(writer, self._fields, self._drop)
            except Exception:  # noqa: BLE001 -- unfaithful: not read here
                self._plans_by_id[schema_id] = None
        plan = self._plans_by_id[schema_id]
        if plan is None:
            return None
        return plan, [_ONE_RECORD + _long(len(value) - 5), memoryview(value)[5:], _SYNC], 1

    def _header(self, value: bytes) -> tuple[bytes, _Plan | None] | None:
        buf = io.BytesIO(value)
        try:
            header = fastavro.schemaless_reader(buf, OCF_HEADER_SCHEMA, None)
            meta = header["meta"]
            text = meta["avro.schema"]
        except Exception:  # noqa: BLE001 -- a damaged header: the message decoder's to judge
            return None
        prefix = value[:buf.tell() - 16]
        if meta.get("avro.codec", b"null") != b"null":
            return prefix, None
        if text not in self._plans:
            if len(self._plans) >= self._MAX_SCHEMAS:
                self._plans.clear()
            try:
                self._plans[text] = _Plan(json.loads(text), self._fields, self._drop)
            except Exception:  # noqa: BLE001 -- unfaithful or damaged: not read here
                self._plans[text] = None
        return prefix, self._plans[text]


def _serve(reads: queue.Queue) -> None:
    """The reading thread: :func:`_decoded` of each group put on ``reads``."""
    while True:
        group, answer = reads.get()
        try:
            answer.put(_decoded(group))
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller to raise
            answer.put(exc)


def _decoded(group: _Group) -> list[tuple[_Group, Any]]:
    """``group`` read; a part polars refuses is halved until its messages stand alone, and
    those are left out (the message decoder judges them)."""
    data = b"".join([group.plan.header, *(piece for blocks in group.blocks
                                          for piece in blocks)])
    try:
        frame = polars_avro.read_avro(io.BytesIO(data), columns=group.plan.columns)
        if frame.height == sum(group.counts):
            return [(group, frame.select(group.plan.exprs))]
    except BaseException as exc:  # noqa: BLE001 -- Rust panics arrive as BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
    n = len(group.indexes)
    if n == 1:
        return []
    return [*_decoded(group.part(range(n // 2))), *_decoded(group.part(range(n // 2, n)))]


class _Plan:
    """How one writer schema is read here: the header of a joined file (the schema with every
    named type written out where it is used, which polars-avro needs), the top-level columns
    to read, and the polars expressions that leave them as the message decoder would."""

    def __init__(self, writer: Any, fields: Tree | None, drop: Tree):
        # a schema fastavro parsed (a registry's) carries its own keys: not the schema's
        expanded = expand_schema(writer)
        if isinstance(expanded, dict):
            expanded = {k: v for k, v in expanded.items() if not k.startswith("__")}
            if fields is not None:  # read as the message decoder reads them
                fields = read_tree(expanded, fields)
        expanded = _unique_names(expanded, {})
        if not (isinstance(expanded, dict) and expanded.get("type") == "record"):
            raise Unfaithful("the writer schema is not a record")
        parsed = fastavro.parse_schema(writer)
        if amplifies(parsed, parsed.get("__named_schemas", {})):
            # collections whose counts the bytes do not bound: the message decoder walks
            # them within MAX_DECODED_BYTES first (runtime/avro_bounds.py)
            raise Unfaithful("items that may take no bytes")
        self.columns: list[str] = []
        self.exprs: list[Any] = []
        for name, value_type in ((f["name"], f["type"]) for f in expanded["fields"]):
            if name in drop and drop[name] is None or fields is not None and name not in fields:
                continue
            expr = _value(value_type, fields[name] if fields else None, drop.get(name) or {},
                          pl.col(name))
            self.columns.append(name)
            self.exprs.append((pl.col(name) if expr is None else expr).alias(name))
        if not self.columns:
            raise Unfaithful("no field of the schema is read")
        present = {f["name"] for f in expanded["fields"]}
        for name in fields or ():
            if name not in present:  # a field this schema version lacks reads as null
                self.exprs.append(pl.lit(None).alias(name))
        out = io.BytesIO()
        fastavro.schemaless_writer(out, OCF_HEADER_SCHEMA, {
            "magic": OCF_MAGIC, "sync": _SYNC,
            "meta": {"avro.schema": json.dumps(expanded).encode(), "avro.codec": b"null"}})
        self.header = out.getvalue()


def _value(schema: Any, tree: Tree | None, drop: Tree, expr: Any) -> Any:
    """The polars expression that makes ``expr``, a value of ``schema``, what the message
    decoder hands back with only ``tree`` of it and without ``drop``; None: ``expr`` as it is.
    Raises :class:`Unfaithful` for a type that polars would hand back as another value."""
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        if len(branches) > 1:
            raise Unfaithful(f"a union of {len(branches)} types")
        return _value(branches[0], tree, drop, expr) if branches else None
    if isinstance(schema, str):
        if schema not in _PRIMITIVES:
            raise Unfaithful(f"type {schema!r}")
        return None
    if schema.get("logicalType"):
        raise Unfaithful(f"logical type {schema['logicalType']!r}")
    kind = schema.get("type")
    if kind in _PRIMITIVES:
        return None
    if kind == "array":
        if schema["items"] == "null" or schema["items"] == {"type": "null"}:
            # Items of no bytes: a damaged count would have the reader build them for ever.
            raise Unfaithful("an array of nulls")
        # DROP_FIELDS paths stop at arrays, as drop_fields does; declared ones go through.
        item = _value(schema["items"], tree, {}, pl.element())
        return None if item is None else expr.list.eval(item)
    if kind != "record":
        raise Unfaithful(f"type {kind!r}")
    if not schema.get("fields"):  # polars has no struct of no fields (and loops on one)
        raise Unfaithful("a record of no fields")
    parts, changed = [], False
    present = set()
    for f in schema["fields"]:
        name = f["name"]
        present.add(name)
        if name in drop and drop[name] is None or tree is not None and name not in tree:
            changed = True
            continue
        sub = expr.struct.field(name)
        inner = _value(f["type"], tree[name] if tree else None, drop.get(name) or {}, sub)
        changed |= inner is not None
        parts.append((sub if inner is None else inner).alias(name))
    for name in tree or ():
        if name not in present:
            parts.append(pl.lit(None).alias(name))
            changed = True
    if not changed:
        return None
    if not parts:  # a struct of no fields: polars has none; an empty record is {}
        raise Unfaithful("a record with every field left out")
    # A null record stays null; pl.struct alone would make a record of nulls of it.
    return pl.when(expr.is_null()).then(None).otherwise(pl.struct(parts))


def _unique_names(node: Any, seen: dict[str, int]) -> Any:
    """``expand_schema``'s output with a named type written out again renamed (``_2``...):
    a name is defined once in a schema, and a record's name is not in its binary form."""
    if isinstance(node, list):
        return [_unique_names(n, seen) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if node.get("type") in ("record", "enum", "fixed", "error") and "name" in node:
        seen[node["name"]] = seen.get(node["name"], 0) + 1
        if seen[node["name"]] > 1:
            node["name"] = f"{node['name']}_{seen[node['name']]}"
    for key in ("fields", "items", "values"):
        if key in node:
            node[key] = _unique_names(node[key], seen)
    if isinstance(node.get("type"), (dict, list)):
        node["type"] = _unique_names(node["type"], seen)
    return node
