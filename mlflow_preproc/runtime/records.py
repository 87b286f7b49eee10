"""The record contract: how ``pre_processing`` is called and what it may return.

Per-record mode (the default): ``pre_processing(record)`` is called once per record, a ``dict``.
What it returns stands for the outputs of that record:

==========================================================  =================================
``pre_processing`` returns                                  outputs
==========================================================  =================================
a dict                                                      that record
``None``, or an empty list / tuple / array                  none: the record is dropped
a list or tuple of dicts                                    one per dict (fan-out)
a list, tuple or 1-d numpy array of numbers, booleans or    one: a feature vector; with feature
strings (``None`` allowed)                                  names, the record ``{name: value}``
any other JSON value (a number, a string, a nested list)    one: that value
==========================================================  =================================

Feature names (``log_model(..., feature_names=[...])`` or a module-level ``FEATURE_NAMES``) name
each value of a vector, in order; a vector of another length is that record's error.

Batch mode (``batch_format="records"`` or ``"pandas"`` at log time): ``pre_processing`` receives
the whole batch, a list of dicts or a pandas DataFrame, and returns a list (or a 2-d array)
with one entry per input, each read as above, or a DataFrame whose index labels point back at
the input rows it came from (filtering rows keeps their labels, so dropped records just vanish).

Columnar mode (``batch_format="arrow"``): ``pre_processing`` receives the batch as a
``pyarrow.Table``, one row per record (nested records are structs, arrays lists; with declared
input fields, only their columns), and returns a ``pyarrow.Table`` or ``RecordBatch`` with one
row per input (that record's output), a ``pyarrow.Array`` with one value per input (a feature
vector each, named by ``FEATURE_NAMES``), or a list as in ``"records"`` mode (to drop or fan
out). The function is written once, over columns (``pyarrow.compute``, or polars and pandas
from Arrow without a copy), the way Fink's science modules are. ``batch_format="polars"`` is
the same with a ``polars.DataFrame`` made from that table without a copy (the columnar
extra); it returns a polars ``DataFrame`` or ``Series`` as the Arrow ones, or a list.

Every mode (pyfunc, file runs, Kafka) goes through :class:`Preprocessor`, so a record gives the
same outputs wherever it is processed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

from mlflow_preproc.runtime import batch_schema
from mlflow_preproc.runtime.dependencies import Misconfigured
from mlflow_preproc.runtime.input_fields import parse as parse_fields
from mlflow_preproc.runtime.input_fields import plain, project

BATCH_FORMATS = (None, "records", "pandas", "arrow", "polars")
COLUMNAR_FORMATS = ("arrow", "polars")  # a table of the batch: process_columns takes them

Record = dict[str, Any]


class RecordError(MlflowException):
    """``pre_processing`` failed on one record.

    An MlflowException, so MLflow's scoring server answers 400 with this message rather than
    a generic one.

    ``index`` is the record's position in its batch (``None`` when a whole batch failed and
    no single record can be named); the original exception is the ``__cause__``.
    """

    def __init__(self, index: int | None, reason: str):
        where = "a batch" if index is None else f"record {index}"
        super().__init__(f"{where}: {reason}", error_code=BAD_REQUEST)
        self.index = index
        self.reason = reason

    # MLflow's scoring server rewrites the message of an MlflowException raised by predict
    # as "Failed to predict data '<numpy's repr of the whole input>'. Error: <message>": the
    # line naming the failing record came after every record of the request. The message is
    # set once, here, and kept.
    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value

    def at(self, index: int) -> RecordError:
        """The same failure, attributed to record ``index``."""
        moved = RecordError(index, self.reason)
        moved.__cause__ = self.__cause__
        return moved


class Preprocessor:
    """Applies a user's ``pre_processing`` function under the record contract."""

    def __init__(self, fn: Callable[[Any], Any], batch_format: str | None = None,
                 feature_names: Sequence[str] | None = None,
                 input_fields: Sequence[str] | None = None, batch_schema: Any = None):
        """``input_fields``: the fields ``fn`` reads (dotted paths); each record is projected
        to them (:mod:`~mlflow_preproc.runtime.input_fields`) before the call.
        ``batch_schema``: the ``pyarrow.Schema`` every pandas or columnar batch is built to
        (:mod:`~mlflow_preproc.runtime.batch_schema`); None (a model logged without one):
        read off each batch, as before."""
        if batch_format not in BATCH_FORMATS:
            raise ValueError(
                f"batch_format={batch_format!r} is not supported; use one of {BATCH_FORMATS}"
            )
        self.fn = fn
        self.batch_format = batch_format
        self.feature_names = list(feature_names) if feature_names else None
        self.fields = parse_fields(input_fields)  # the tree decoders read
        self.batch_schema = batch_schema

    def process(self, records: Sequence[Record]) -> list[list[Any]]:
        """Return the outputs of each input record; raise :class:`RecordError` on a failure."""
        if self.fields is not None:
            records = [project(r, self.fields) for r in records]
        if self.batch_format is None:
            return [self._call_one(i, r) for i, r in enumerate(records)]
        return self._call_batch(records)

    def process_each(self, records: Sequence[Record]) -> list[list[Any] | RecordError]:
        """Like :meth:`process`, but a failing record yields its error instead of raising.

        Streaming uses this so one poison record goes to the dead-letter topic while the rest
        of its batch carries on. In batch mode a failed batch is retried record by record to
        find which records are to blame.
        """
        if self.fields is not None:
            records = [project(r, self.fields) for r in records]
        if self.batch_format is not None and len(records) > 1:
            try:
                return list(self._call_batch(records))
            except RecordError:
                pass
        results: list[list[Any] | RecordError] = []
        if self.batch_format is None:  # the loop of every stream: kept to one call a record
            call = self._call_one
            for i, record in enumerate(records):
                try:
                    results.append(call(i, record))
                except RecordError as err:  # raised for record i already
                    results.append(err)
            return results
        for i, record in enumerate(records):
            try:
                results.append(self._call_batch([record])[0])
            except RecordError as err:
                results.append(err.at(i))
        return results

    def process_columns(self, table: Any) -> list[list[Any] | RecordError]:
        """:meth:`process_each` for a columnar ``batch_format`` (``"arrow"``, ``"polars"``)
        over a ``pyarrow.Table`` of records that has only the declared columns already
        (Spark's Arrow batches, the DataFrame cut to them; a stream's polars-avro read): no
        record is built, unless to name one that fails."""
        n = table.num_rows
        if self.batch_schema is not None:
            try:
                table = batch_schema.conform(table, self.batch_schema)
            except Exception:  # noqa: BLE001 -- a value that cannot be cast: find its record
                return self.process_each(table.to_pylist())
        if n > 1:
            try:
                return self._call_on(self._columns(table), n)
            except RecordError:
                pass
        results: list[list[Any] | RecordError] = []
        for i in range(n):
            try:
                results.append(self._call_on(self._columns(table.slice(i, 1)), 1)[0])
            except RecordError as err:
                results.append(err.at(i))
        return results

    def _call_one(self, index: int, record: Record) -> list[Any]:
        try:
            out = self.fn(record)
        except ImportError as exc:
            raise missing_library(exc) from exc
        except Exception as exc:
            raise RecordError(index, f"pre_processing raised {type(exc).__name__}: {exc}") from exc
        if self.fields is not None:
            out = plain(out)  # a projected part passed on is a plain dict again
        if type(out) is dict:  # normalise_output's first case, without its call
            return [out]
        return normalise_output(out, index, self.feature_names)

    def _call_batch(self, records: Sequence[Record]) -> list[list[Any]]:
        if self.batch_format == "pandas":
            batch: Any = self._frame(records)
        elif self.batch_format in COLUMNAR_FORMATS:
            batch = self._columns(_table(records, self.batch_schema))
        else:
            batch = list(records)
        return self._call_on(batch, len(records))

    def _frame(self, records: Sequence[Record]) -> Any:
        import pandas as pd

        if self.batch_schema is None:
            return pd.DataFrame.from_records(list(records))
        try:
            return batch_schema.frame(records, self.batch_schema, self.fields)
        except Exception as exc:  # noqa: BLE001 -- pyarrow's errors on a value of a batch
            raise _unfit(records, exc) from exc

    def _columns(self, table: Any) -> Any:
        """A columnar batch as the function takes it: the table, or polars' frame of it."""
        if self.batch_format == "polars":
            import polars as pl

            return pl.from_arrow(table)  # shares the table's buffers
        return table

    def _call_on(self, batch: Any, n: int) -> list[list[Any]]:
        """``fn`` on ``batch`` of ``n`` records; the outputs of each."""
        try:
            out = self.fn(batch)
            if self.fields is not None and isinstance(out, (list, dict)):
                out = plain(out)
        except ImportError as exc:
            raise missing_library(exc) from exc
        except Exception as exc:
            raise RecordError(0 if n == 1 else None,
                              f"pre_processing raised {type(exc).__name__}: {exc}") from exc
        return _split_batch_output(out, n, self.feature_names)


def missing_library(exc: ImportError) -> Misconfigured:
    """``pre_processing`` imports a module this environment lacks: every record would fail
    alike, so it is no record's verdict (#32: a dead letter is never one on the environment)."""
    name = exc.name or str(exc)
    return Misconfigured(f"pre_processing needs {name!r}, which cannot be imported here "
                         f"({type(exc).__name__}: {exc}); install it, or add it to the model's "
                         "requirements (log_model(..., extra_pip_requirements=[...])) and build "
                         "the image again")


_SCALARS = (str, int, float, bool)


def normalise_output(out: Any, index: int, feature_names: list[str] | None = None) -> list[Any]:
    """Map one call's return value to the list of outputs it stands for (see the table)."""
    if type(out) is dict:  # the common cases first: this runs for every record
        return [out]
    if out is None:
        return []
    if isinstance(out, Mapping):
        return [dict(out)]
    if _is_dataframe(out):
        return out.to_dict(orient="records")
    if _is_polars(out):
        out = out.to_arrow().to_pylist()  # a frame's rows (dicts), a series' values
    if type(out).__name__ == "ndarray":
        out = out.tolist()  # a 1-d array is a vector, a 0-d one a scalar
    if isinstance(out, (list, tuple)):
        if not out:
            return []
        if all(isinstance(o, Mapping) for o in out):
            return [dict(o) for o in out]
        if any(isinstance(o, Mapping) for o in out):
            raise RecordError(index, "pre_processing returned a list that mixes dicts and "
                              "values; return a list of dicts (to fan out) or a list of "
                              "values (one feature vector)")
    return [_named(out, index, feature_names) if feature_names else out]


def _named(vector: Any, index: int, names: list[str]) -> dict[str, Any]:
    values = list(vector) if isinstance(vector, (list, tuple)) else [vector]
    if len(values) != len(names):
        raise RecordError(index, f"pre_processing returned {len(values)} value(s) but "
                          f"FEATURE_NAMES names {len(names)}; return one value per name, in "
                          "the order of FEATURE_NAMES")
    return dict(zip(names, values))


def _table(records: Sequence[Record], schema: Any = None) -> Any:
    """The records as one Arrow table of ``schema`` (None: of the types found in them); a
    record Arrow cannot hold (a value of no Arrow type, or not of its column's type) fails
    the batch, and alone, that record."""
    import pyarrow as pa

    try:
        if schema is not None:
            return batch_schema.table(records, schema)
        return pa.Table.from_pylist([plain(r) for r in records])
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        raise _unfit(records, exc) from exc


def _unfit(records: Sequence[Record], exc: Exception) -> RecordError:
    index = 0 if len(records) == 1 else None
    return RecordError(index, f"the record(s) cannot be read as the batch's columns "
                       f"({type(exc).__name__}: {exc}); the columns and types are the input "
                       "example's: log the model with an input example whose values have "
                       "the types the records have, or use batch_format='records'")


def _split_batch_output(out: Any, n_inputs: int, feature_names: list[str] | None = None
                        ) -> list[list[Any]]:
    if _is_polars(out):
        out = out.to_arrow()  # a DataFrame becomes a Table, a Series an Array
    if _is_arrow(out):
        rows = out.to_pylist()  # a table's rows are dicts, an array's values vectors
        if len(rows) != n_inputs:
            raise RecordError(None, f"with a columnar batch_format pre_processing returned "
                              f"{len(rows)} rows for {n_inputs} input records; return one "
                              "row per input, or a list (None drops a record, a list of "
                              "dicts fans it out)")
        return [normalise_output(o, i, feature_names) for i, o in enumerate(rows)]
    if _is_dataframe(out):
        grouped: list[list[Any]] = [[] for _ in range(n_inputs)]
        for label, row in zip(out.index, out.to_dict(orient="records")):
            if not (isinstance(label, int) or hasattr(label, "__index__")) or not 0 <= label < n_inputs:
                raise RecordError(
                    None,
                    f"pre_processing returned a DataFrame with index label {label!r}, which is "
                    f"not a row of the {n_inputs}-row input; keep the input's index "
                    "(filter or transform rows, don't reset_index)",
                )
            grouped[int(label)].append(row)
        return grouped
    if type(out).__name__ == "ndarray" and out.ndim == 2:
        out = list(out)  # one feature vector per input row
    if isinstance(out, (list, tuple)) and len(out) == n_inputs:
        return [normalise_output(o, i, feature_names) for i, o in enumerate(out)]
    got = f"a list of {len(out)}" if isinstance(out, (list, tuple)) else type(out).__name__
    raise RecordError(
        None,
        f"in batch mode pre_processing returned {got} for {n_inputs} input records; return a "
        "list with one entry per input (a dict, None, a list of dicts or a feature vector) or "
        "a DataFrame that keeps the input's index",
    )


def _is_arrow(value: Any) -> bool:
    return type(value).__module__.startswith("pyarrow") and hasattr(value, "to_pylist")


def _is_polars(value: Any) -> bool:
    return type(value).__module__.startswith("polars") and hasattr(value, "to_arrow")


def _is_dataframe(value: Any) -> bool:
    """A pandas DataFrame (polars' has no index, and is read by :func:`_is_polars`)."""
    return type(value).__name__ == "DataFrame" and hasattr(value, "to_dict") and \
        hasattr(value, "index")


def as_records(data: Any) -> list[Record]:
    """Normalise what MLflow's pyfunc hands to ``predict`` into a list of record dicts.

    The scoring server gives a list of dicts for ``{"inputs": [...]}`` (each value wrapped in a
    numpy array, which is unwrapped here so REST callers and Python callers feed
    ``pre_processing`` the same values), a DataFrame for
    ``dataframe_records``/``dataframe_split``/CSV, and a dict of numpy arrays for
    ``{"instances": [...]}``; Python callers may also pass a single dict.
    """
    if _is_polars(data) and hasattr(data, "columns"):  # a polars DataFrame, from Python
        return data.to_arrow().to_pylist()
    if _is_dataframe(data):
        # Spark (spark_udf) hands array columns over as numpy arrays; records hold lists, as
        # from every other source, so `x or []` and `x == [...]` work the same.
        return [{k: _plain(v) for k, v in r.items()} for r in data.to_dict(orient="records")]
    if isinstance(data, Mapping):
        values = list(data.values())
        if values and all(type(v).__name__ == "ndarray" for v in values):
            if all(v.ndim == 0 for v in values):  # {"inputs": {...}}: one record
                return [{k: v.item() for k, v in data.items()}]
            import pandas as pd

            return pd.DataFrame({k: list(v) for k, v in data.items()}).to_dict(orient="records")
        return [dict(data)]
    if isinstance(data, (list, tuple)):
        bad = next((i for i, r in enumerate(data) if not isinstance(r, Mapping)), None)
        if bad is not None:
            raise TypeError(
                f"input record {bad} is a {type(data[bad]).__name__}, not a JSON object; send "
                'records as objects, e.g. {"inputs": [{"field": 1}, {"field": 2}]}'
            )
        return [{k: _plain(v) for k, v in r.items()} for r in data]
    raise TypeError(
        f"cannot read records from a {type(data).__name__}; pass a dict, a list of dicts or a "
        'pandas DataFrame (over REST: {"inputs": [{...}, ...]} or "dataframe_records")'
    )


def _plain(value: Any) -> Any:
    # 0-d arrays become scalars (or the dict/str they hold), n-d arrays nested lists.
    return value.tolist() if type(value).__name__ == "ndarray" else value
