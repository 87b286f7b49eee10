"""Declared input fields: the parts of a record ``pre_processing`` reads.

A ZTF alert holds ~3,000 values; a feature function reads a dozen. Declared with the model
(``log_model(..., input_fields=[...])``, or ``INPUT_FIELDS`` beside ``pre_processing`` in its
module), the fields are all the function sees, everywhere it runs (REST, ``run``, ``stream``,
Spark)::

    INPUT_FIELDS = ["objectId", "candidate.magpsf", "candidate.sigmapsf", "prv_candidates.jd"]

A dotted path names a field of a nested record; through an array of records it names that field
of every item (``prv_candidates.jd``). A declared field a record lacks (an older schema version)
reads as ``None``. Reading a field that was not declared raises :class:`UndeclaredFieldError`,
never a quiet ``None``: a feature computed from a missing field would be silently wrong.

Avro decoders read only the declared fields (:func:`reader_schema`, a reader schema for Avro's
schema resolution), which is where the time goes: see benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

# path -> subtree; None: the whole value
Tree = dict[str, "Tree | None"]


class UndeclaredFieldError(RuntimeError):
    """``pre_processing`` read a field outside the model's input fields.

    Not a KeyError: a function catching KeyError for an optional field must not swallow it.
    """


def parse(fields: Iterable[str] | None, where: str = "input_fields") -> Tree | None:
    """The tree of dotted ``fields`` (None: no declaration, every field is read)."""
    if fields is None:
        return None
    if isinstance(fields, str) or not all(isinstance(f, str) and f for f in fields):
        raise ValueError(f"{where} must be a list of field names, e.g. ['objectId', "
                         "'candidate.magpsf', 'prv_candidates.jd']")
    tree: Tree = {}
    for path in fields:
        parts = path.split(".")
        if not all(parts):
            raise ValueError(f"{where}: {path!r} is not a field path; write parent.child, "
                             "e.g. candidate.magpsf")
        node: Tree = tree
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part in node and node[part] is None:
                break  # the whole field is declared already
            if last:
                node[part] = None
            else:
                node = node.setdefault(part, {})  # type: ignore[assignment]
    return tree


class ProjectedRecord(dict):
    """A record holding only the declared fields; reading any other raises
    :class:`UndeclaredFieldError` (``[]``, ``.get()`` and ``in`` alike)."""

    path = ""

    def __missing__(self, key: str) -> Any:
        raise self._undeclared(key)

    def get(self, key: str, default: Any = None) -> Any:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        raise self._undeclared(key)

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        raise self._undeclared(key)

    def pop(self, key: str, *default: Any) -> Any:
        if dict.__contains__(self, key):
            return dict.pop(self, key)
        raise self._undeclared(key)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        raise self._undeclared(key)

    def copy(self) -> ProjectedRecord:
        twin = ProjectedRecord(self)
        twin.path = self.path
        return twin

    def _undeclared(self, key: object) -> UndeclaredFieldError:
        return undeclared(f"{self.path}.{key}" if self.path else str(key))


def undeclared(name: str) -> UndeclaredFieldError:
    """The error of a read of ``name``, a field outside the input fields."""
    return UndeclaredFieldError(
        f"pre_processing read {name!r}, which is not one of the model's input_fields; "
        f"add {name!r} to input_fields (log_model(..., input_fields=[...]) or INPUT_FIELDS) "
        "and log the model again")


def project(value: Any, tree: Tree | None, path: str = "") -> Any:
    """``value`` with only the fields of ``tree`` (each declared one, None if it lacks it)."""
    if tree is None:
        return value
    if isinstance(value, dict):
        out = ProjectedRecord()
        for name, sub in tree.items():
            out[name] = project(value.get(name), sub, f"{path}.{name}" if path else name)
        out.path = path
        return out
    if isinstance(value, (list, tuple)):
        return [project(item, tree, path) for item in value]
    return value


def plain(value: Any) -> Any:
    """``value`` with every :class:`ProjectedRecord` in it as a plain dict (what a function
    returns goes on to encoders, which look up optional fields with ``in``)."""
    if isinstance(value, dict):
        if type(value) is dict and not any(isinstance(v, (dict, list)) for v in value.values()):
            return value
        return {k: plain(v) for k, v in dict.items(value)}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def merge(a: Tree, b: Tree) -> Tree:
    """The fields of both trees (a field whole in either is whole)."""
    out: Tree = dict(a)
    for name, sub in b.items():
        if name not in out:
            out[name] = sub
        elif out[name] is not None:
            out[name] = None if sub is None else merge(out[name], sub)  # type: ignore[arg-type]
    return out


def paths(tree: Tree, prefix: str = "") -> list[str]:
    """The dotted paths of ``tree`` (what the user declared, normalised)."""
    out: list[str] = []
    for name, sub in tree.items():
        full = f"{prefix}.{name}" if prefix else name
        out += [full] if sub is None else paths(sub, full)
    return out


# ---- Avro: decode only what is declared -----------------------------------------------------

def reader_schema(writer: Any, tree: Tree) -> Any:
    """An Avro reader schema of ``writer`` (its JSON form) with only the fields of ``tree``.

    Types come from the writer; a declared field the writer lacks is ``null`` with default
    null, so one declaration serves every schema version. Named types keep their names (Avro
    resolves records by name); one defined inside a field that is left out is defined where
    it is used.
    """
    named: dict[str, Any] = {}
    _collect_named(writer, "", named)
    # A named record may be used in several places with different declared fields (ZTF's three
    # cutouts share one type): it is defined once, so with the fields of all its uses.
    wants: dict[str, Tree | None] = {}
    _gather(writer, tree, "", named, wants)
    return _ReaderBuilder(named, wants).build(writer, tree, "")


def read_tree(writer: Any, tree: Tree) -> Tree:
    """``tree`` as :func:`reader_schema` reads it from ``writer`` (a schema with every named
    type written out where it is used, as ``expand_schema`` gives it): a named record used in
    several places is read with the fields of all its uses (Rubin's ``diaSource`` and
    ``prvDiaSources`` share one), so a reader of columns hands back what fastavro does."""
    named: dict[str, Any] = {}
    _collect_named(writer, "", named)
    wants: dict[str, Tree | None] = {}
    _gather(writer, tree, "", named, wants)
    return _widened(writer, tree, "", wants) or tree


def _widened(schema: Any, tree: Tree | None, namespace: str, wants: dict[str, Tree | None]
             ) -> Tree | None:
    if tree is None:
        return None
    if isinstance(schema, list):
        # the branch that holds the fields (a union of records of one path is not read)
        return next((_widened(b, tree, namespace, wants) for b in schema
                     if isinstance(b, dict)), tree)
    if not isinstance(schema, dict):
        return tree
    kind = schema.get("type")
    if kind == "array":
        return _widened(schema.get("items"), tree, namespace, wants)
    if kind not in ("record", "error"):
        return _widened(kind, tree, namespace, wants) if isinstance(kind, (dict, list)) \
            else tree
    full, namespace = _fullname(schema, namespace)
    wanted = wants.get(full, tree)
    if wanted is None:
        return None
    types = {f["name"]: f["type"] for f in schema.get("fields", [])}
    return {name: _widened(types[name], sub, namespace, wants) if name in types else sub
            for name, sub in wanted.items()}


_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})


def _resolve(name: str, namespace: str, named: dict[str, Any]) -> str:
    full = name if "." in name or not namespace else f"{namespace}.{name}"
    return name if full not in named and name in named else full


def _either(a: Tree | None, b: Tree | None) -> Tree | None:
    return None if a is None or b is None else merge(a, b)


def _gather(schema: Any, tree: Tree | None, namespace: str, named: dict[str, Any],
            wants: dict[str, Tree | None]) -> None:
    """Record in ``wants`` the fields each named record is read with, over all its uses."""
    if isinstance(schema, list):
        for branch in schema:
            _gather(branch, tree, namespace, named, wants)
    elif isinstance(schema, str):
        full = _resolve(schema, namespace, named) if schema not in _PRIMITIVES else None
        if full in named:
            definition, ns = named[full]
            _gather(definition, tree, ns, named, wants)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in ("record", "error"):
            full, namespace = _fullname(schema, namespace)
            if full in wants:
                merged = _either(wants[full], tree)
                if merged == wants[full]:
                    return  # nothing new (and the end of a recursive type)
                tree = merged
            wants[full] = tree
            for field in schema.get("fields", []):
                if tree is None or field["name"] in tree:
                    _gather(field["type"], None if tree is None else tree[field["name"]],
                            namespace, named, wants)
        elif kind == "array":
            _gather(schema.get("items"), tree, namespace, named, wants)
        elif kind == "map":  # a path below a map names its keys (as in JSON): values whole
            _gather(schema.get("values"), None, namespace, named, wants)
        elif isinstance(kind, (dict, list)) or (isinstance(kind, str) and
                                                kind not in _PRIMITIVES):
            _gather(kind, tree, namespace, named, wants)


def _fullname(schema: dict, namespace: str) -> tuple[str, str]:
    name = schema["name"]
    ns = schema.get("namespace", namespace)
    if "." in name:
        return name, name.rpartition(".")[0]
    return (f"{ns}.{name}" if ns else name), ns


def _collect_named(schema: Any, namespace: str, named: dict[str, Any]) -> None:
    if isinstance(schema, list):
        for branch in schema:
            _collect_named(branch, namespace, named)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in ("record", "error", "enum", "fixed"):
            full, namespace = _fullname(schema, namespace)
            named[full] = (schema, namespace)
        if kind in ("record", "error"):
            for field in schema.get("fields", []):
                _collect_named(field["type"], namespace, named)
        elif kind == "array":
            _collect_named(schema.get("items"), namespace, named)
        elif kind == "map":
            _collect_named(schema.get("values"), namespace, named)
        elif isinstance(kind, (dict, list)):
            _collect_named(kind, namespace, named)


class _ReaderBuilder:
    def __init__(self, named: dict[str, Any], wants: dict[str, Tree | None]):
        self._named = named
        self._wants = wants
        self._defined: set[str] = set()

    def build(self, schema: Any, tree: Tree | None, namespace: str) -> Any:
        if isinstance(schema, list):
            return [self.build(branch, tree, namespace) for branch in schema]
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return schema
            full = _resolve(schema, namespace, self._named)
            if full in self._defined or full not in self._named:
                return full
            definition, ns = self._named[full]
            return self.build(definition, tree, ns)  # defined here: its first use is left out
        kind = schema.get("type")
        if kind in ("record", "error"):
            full, namespace = _fullname(schema, namespace)
            self._defined.add(full)
            tree = self._wants.get(full, tree)
            fields = schema.get("fields", [])
            if tree is not None:
                by_name = {f["name"]: f for f in fields}
                fields = [self._field(by_name[n], sub, namespace) if n in by_name else
                          {"name": n, "type": "null", "default": None}
                          for n, sub in tree.items()]
            else:
                fields = [self._field(f, None, namespace) for f in fields]
            return {"type": "record", "name": full, "fields": fields}
        if kind in ("enum", "fixed"):
            full, _ = _fullname(schema, namespace)
            self._defined.add(full)
            return {**{k: v for k, v in schema.items() if k != "namespace"}, "name": full}
        if kind == "array":
            return {**schema, "items": self.build(schema["items"], tree, namespace)}
        if kind == "map":
            return {**schema, "values": self.build(schema["values"], None, namespace)}
        if isinstance(kind, (dict, list, str)) and kind not in _PRIMITIVES:
            return self.build(kind, tree, namespace)
        return schema

    def _field(self, field: dict, sub: Tree | None, namespace: str) -> dict:
        out = {"name": field["name"], "type": self.build(field["type"], sub, namespace)}
        if "default" in field:
            out["default"] = field["default"]
        return out


def suggest(fn: Callable[[Any], Any], records: Sequence[Any]) -> list[str]:
    """The fields ``fn`` reads of ``records`` (traced, for a first ``input_fields`` to paste;
    never applied silently): every key it looks up, as dotted paths."""
    seen: dict[str, None] = {}

    def trace(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return _Tracing(value, path, seen, trace)
        if isinstance(value, list):
            return [trace(item, path) for item in value]
        return value

    for record in records:
        try:
            fn(trace(record, ""))
        except Exception:  # noqa: BLE001 -- what it read before failing still counts
            pass
    return [p for p in seen if not any(q.startswith(p + ".") for q in seen)]  # leaves


class _Tracing(dict):
    def __init__(self, data: dict, path: str, seen: dict[str, None], trace: Callable):
        super().__init__(data)
        self._path, self._seen, self._trace = path, seen, trace

    def _at(self, key: str) -> str:
        full = f"{self._path}.{key}" if self._path else str(key)
        self._seen[full] = None
        return full

    def __getitem__(self, key: str) -> Any:
        full = self._at(key)
        return self._trace(dict.__getitem__(self, key), full)

    def get(self, key: str, default: Any = None) -> Any:
        full = self._at(key)
        if not dict.__contains__(self, key):
            return default
        return self._trace(dict.__getitem__(self, key), full)

    def __contains__(self, key: object) -> bool:
        self._at(str(key))
        return dict.__contains__(self, key)
