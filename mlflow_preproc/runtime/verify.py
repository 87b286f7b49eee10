"""``mlflow-preproc verify``: a model's outputs on reference records, in this environment.

    mlflow-preproc verify -m models:/fink-preproc/2
    mlflow-preproc verify -m models:/fink-preproc/2 --reference night.jsonl
    mlflow-preproc verify -m models:/fink-preproc@candidate --reference alerts.avro \\
        --against models:/fink-preproc@champion

Without ``--against`` the expected outputs are those logged with the records: the model's own
reference records, or a reference file (:mod:`~mlflow_preproc.runtime.parity`). With
``--against`` they are the outputs of the other model (the champion) on the same records, run
here: the records whose outputs the candidate changes are listed, which is the gate between
"a new version is registered" and "it is promoted".
"""

from __future__ import annotations

from pathlib import Path

from mlflow_preproc.config import ConfigError
from mlflow_preproc.runtime import parity
from mlflow_preproc.runtime.flavor import load_preprocessing


def verify(model_uri: str, reference: str | None = None, against: str | None = None
           ) -> parity.Report:
    """Check ``model_uri``; raises :class:`~mlflow_preproc.config.ConfigError` when there is
    nothing to check it on."""
    candidate = load_preprocessing(model_uri)
    tolerance = candidate.reference.tolerance if candidate.reference else \
        parity.DEFAULT_TOLERANCE
    stored = _reference(reference, candidate, against is not None)
    if against is None:
        return parity.check(candidate.preprocessor, stored, tolerance, model_uri)
    # One model at a time: the champion's code is loaded once the candidate's has run, so a
    # module both import by one name is each one's own.
    records = stored.records
    mine = parity.outputs_of(candidate.preprocessor, _copies(records))
    theirs = parity.outputs_of(load_preprocessing(against).preprocessor, _copies(records))
    return parity.Report(model_uri, len(records),
                         parity.compare(theirs, mine, tolerance, records), against=against)


def _reference(reference: str | None, candidate, against: bool) -> parity.Reference:
    """The records to run, with the outputs expected of them (none for a file of records
    only, which needs ``--against``)."""
    if reference is None:
        if candidate.reference is None:
            raise ConfigError("the model was logged without reference records; pass "
                              "--reference FILE (records, or a reference file), or log it "
                              "with reference_records=[...] (or an input_example)")
        return parity.read(candidate.reference.path)
    if not Path(reference).is_file():
        raise ConfigError(f"--reference {reference}: no such file")
    if parity.is_reference_file(reference):
        try:
            return parity.read(reference)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if not against:
        raise ConfigError(f"--reference {reference} holds records without the outputs "
                          "expected of them; add --against MODEL_URI (that model's outputs "
                          "on them are the expected ones), or pass a reference file")
    return parity.Reference(_read_records(reference), [])


def _read_records(path: str) -> list[dict]:
    from mlflow_preproc.runtime.formats import DecodeError, read_records, sniff_file_format

    with open(path, "rb") as f:
        fmt = sniff_file_format(path, f.peek(8)[:8])
        records = list(read_records(f, fmt, path))
    for index, record in enumerate(records):
        if isinstance(record, DecodeError):
            raise ConfigError(f"--reference {path}: record {index} cannot be read ({record}); "
                              "verify runs on records that all decode")
    return records


def _copies(records: list[dict]) -> list[dict]:
    import copy

    return copy.deepcopy(records)  # each model gets the records as they were read
