"""What happens when something fails, at every boundary of the data path: one table.

The rule behind it: **a dead letter (a reject, an HTTP 400) is a verdict on a record, never on
the environment.** A record the code cannot process goes to the dead-letter topic (``run``:
the rejects file) with the stage and the reason, and the stream goes on. A dependency that
does not answer, or answers badly, is waited for; one that refuses this client, or a library
or setting that is missing, stops the process with one line naming the fix. Nothing is
committed past a record that was neither delivered nor dead-lettered.

:data:`TABLE` holds the outcome of every fault class at every boundary. docs/concepts.md
shows it (:func:`table_markdown`), and tests/test_verdicts.py holds the suite to it: every
cell that is not "not applicable" has at least one test marked for it
(``@verdict(boundary, fault)``, tests/verdict_cells.py), so a boundary or a fault class cannot
be added without its verdicts and their tests.

Where the outcome is carried out:

- the record's: :class:`~mlflow_preproc.runtime.formats.DecodeError`, a
  :class:`~mlflow_preproc.runtime.records.RecordError`, a model server's 400/413/422, a record
  it fails alone (``RECORD_ATTEMPTS``), a delivery error about the record
  (:mod:`~mlflow_preproc.streaming.delivery`);
- the dependency's: :class:`~mlflow_preproc.runtime.dependencies.Unavailable`, waited for by
  :meth:`~mlflow_preproc.streaming.loop.KafkaLoop.when_available`; retriable delivery errors;
- the configuration's: :class:`~mlflow_preproc.runtime.dependencies.Misconfigured` and
  :class:`~mlflow_preproc.streaming.errors.FatalError`, exit 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

BOUNDARIES = (
    "file read", "decode", "schema registry in", "pre_processing", "in-process predict",
    "bridge call", "encode", "schema registry out", "produce output", "produce dead letter",
    "commit", "file write", "replay",
)
FAULTS = (
    "bad record", "dependency down", "dependency slow", "not its protocol",
    "auth/ACL refused", "missing library or codec", "resource bound exceeded", "signal",
    "fenced",
    "environment drift",
)


class Outcome(Enum):
    """What a failure leads to."""

    DEAD_LETTER = "dead letter"  # the record: DLQ (run: rejects; REST: 400), stage, reason
    WAIT = "wait"  # input paused, retried with backoff, nothing committed, /healthz says why
    STOP = "stop"  # exit 2 naming the fix, nothing committed (run: no output replaced)
    REFUSE = "refused at start"  # before any record is read, naming the fix
    BRAKE = "brake"  # dead letters until most of DLQ_BRAKE_WINDOW fail: then stop committing
    RESTART = "restart"  # the process goes on but /healthz fails saying why
    FINISH = "finish"  # a signal: the batch finished, delivered, committed; exit 0
    ABORT = "abort"  # exactly-once: the open transaction aborted, none of it visible
    NOT_APPLICABLE = "n/a"  # the fault cannot arise at this boundary (the note says why)


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    note: str


def _v(outcome: Outcome, note: str) -> Verdict:
    return Verdict(outcome, note)


DL, WAIT, STOP, REFUSE = Outcome.DEAD_LETTER, Outcome.WAIT, Outcome.STOP, Outcome.REFUSE
NA = Outcome.NOT_APPLICABLE
_SIGNAL = _v(Outcome.FINISH, "SIGTERM/SIGINT: the batch in flight is finished, delivered and "
                             "committed, a wait given up uncommitted; exit 0")
_NO_DEPENDENCY = "no dependency of its own at this boundary"
# "fenced": another member owns the partitions now (this one was frozen or cut off past its
# session, a zombie). Only a commit can tell, and only a commit can do harm.
_FENCED_AT_COMMIT = _v(NA, "the group's coordinator judges a zombie when it commits")
# Environment drift: the model's reference records give other outputs than where it was
# logged (runtime/parity.py). Only where the model's code runs can it show.
_NO_MODEL_CODE = _v(NA, "no model code runs here; the drift shows at pre_processing")

TABLE: dict[tuple[str, str], Verdict] = {
    # ---- file read: run opening its inputs
    ("file read", "bad record"): _v(NA, "what a file holds is judged at decode"),
    ("file read", "dependency down"): _v(STOP, "an input missing: exit 2 naming it; the "
                                               "output left as it was"),
    ("file read", "dependency slow"): _v(NA, "a slow file system is only slow"),
    ("file read", "not its protocol"): _v(NA, "a file has no protocol: its bytes are judged at "
                                              "decode"),
    ("file read", "auth/ACL refused"): _v(NA, "as a missing input (one OSError path, exit 2); "
                                              "root, which runs the suite, reads every file"),
    ("file read", "missing library or codec"): _v(NA, "file codecs are judged at decode"),
    ("file read", "resource bound exceeded"): _v(NA, "files are read in bounded pieces; the "
                                                     "bounds are decode's"),
    ("file read", "signal"): _v(Outcome.FINISH, "run stops, exit 128+n, its outputs and "
                                                "rejects left as they were (never truncated)"),
    ("file read", "fenced"): _v(NA, "run reads files, in no consumer group"),
    ("file read", "environment drift"): _NO_MODEL_CODE,
    # ---- decode: bytes to records (stream, bridge, run, Spark)
    ("decode", "bad record"): _v(DL, "stage decode, the decoder's reason"),
    ("decode", "dependency down"): _v(NA, _NO_DEPENDENCY + " (the registry is its own)"),
    ("decode", "dependency slow"): _v(NA, _NO_DEPENDENCY),
    ("decode", "not its protocol"): _v(NA, _NO_DEPENDENCY),
    ("decode", "auth/ACL refused"): _v(NA, _NO_DEPENDENCY),
    ("decode", "missing library or codec"): _v(STOP, "a block in snappy, zstandard or lz4 "
                                                     "without its package: exit 2 naming it"),
    ("decode", "resource bound exceeded"): _v(DL, "a block over MAX_DECODED_BYTES, counts past "
                                                  "MAX_DECODED_BYTES/8 values, a schema text "
                                                  "over 1 MiB: the bound named"),
    ("decode", "signal"): _SIGNAL,
    ("decode", "fenced"): _FENCED_AT_COMMIT,
    ("decode", "environment drift"): _NO_MODEL_CODE,
    # ---- schema registry in: confluent-avro input
    ("schema registry in", "bad record"): _v(DL, "an id the registry does not know, a schema "
                                                 "that cannot be used: stage decode"),
    ("schema registry in", "dependency down"): _v(WAIT, "5xx, refused connections"),
    ("schema registry in", "dependency slow"): _v(WAIT, "no answer within the client's timeout"),
    ("schema registry in", "not its protocol"): _v(WAIT, "an answer that is no registry's "
                                                         "(a proxy's page)"),
    ("schema registry in", "auth/ACL refused"): _v(STOP, "401/403, or a 404 that is not the "
                                                         "registry's own"),
    ("schema registry in", "missing library or codec"): _v(REFUSE, "confluent-kafka's "
                                                                   "schemaregistry extra"),
    ("schema registry in", "resource bound exceeded"): _v(NA, "a registry answers one schema; "
                                                              "its references nest at most 32 "
                                                              "deep"),
    ("schema registry in", "signal"): _SIGNAL,
    ("schema registry in", "fenced"): _FENCED_AT_COMMIT,
    ("schema registry in", "environment drift"): _NO_MODEL_CODE,
    # ---- pre_processing: the user's function
    ("pre_processing", "bad record"): _v(DL, "stage preprocess, the exception named"),
    ("pre_processing", "dependency down"): _v(Outcome.BRAKE, "a service the function calls is "
                                                             "the function's: its records fail, "
                                                             "and the brake stops committing "
                                                             "once most of a window did"),
    ("pre_processing", "dependency slow"): _v(Outcome.RESTART, "no progress for HEALTH_STALL_S: "
                                                               "/healthz fails, saying so"),
    ("pre_processing", "not its protocol"): _v(NA, "the function's own calls: as dependency "
                                                   "down"),
    ("pre_processing", "auth/ACL refused"): _v(NA, "the function's own calls: as dependency "
                                                   "down"),
    ("pre_processing", "missing library or codec"): _v(STOP, "a module it cannot import: exit "
                                                             "2 naming it"),
    ("pre_processing", "resource bound exceeded"): _v(DL, "a MemoryError on a record: that "
                                                          "record's, found alone"),
    ("pre_processing", "signal"): _SIGNAL,
    ("pre_processing", "fenced"): _FENCED_AT_COMMIT,
    ("pre_processing", "environment drift"): _v(REFUSE, "the reference records give other "
                                                        "outputs than logged: refused at start "
                                                        "with the diff (PARITY_CHECK=warn: "
                                                        "logged)"),
    # ---- in-process predict: stream --prediction-model-uri
    ("in-process predict", "bad record"): _v(DL, "stage predict, found alone"),
    ("in-process predict", "dependency down"): _v(NA, "the model runs in the process"),
    ("in-process predict", "dependency slow"): _v(NA, "the model runs in the process"),
    ("in-process predict", "not its protocol"): _v(NA, "the model runs in the process"),
    ("in-process predict", "auth/ACL refused"): _v(NA, "the model runs in the process"),
    ("in-process predict", "missing library or codec"): _v(REFUSE, "the model's library: "
                                                                   "refused at start naming it"),
    ("in-process predict", "resource bound exceeded"): _v(DL, "a MemoryError on a record: that "
                                                              "record's, found alone"),
    ("in-process predict", "signal"): _SIGNAL,
    ("in-process predict", "fenced"): _FENCED_AT_COMMIT,
    ("in-process predict", "environment drift"): _v(NA, "the prediction model is any pyfunc: "
                                                            "it logs no reference outputs"),
    # ---- bridge call: a model server over HTTP
    ("bridge call", "bad record"): _v(DL, "400/413/422 on the record alone; a record the server "
                                          "fails alone RECORD_ATTEMPTS times while it answers "
                                          "others"),
    ("bridge call", "dependency down"): _v(WAIT, "refused connections, 408/425/429/503; a "
                                                 "server failing every record"),
    ("bridge call", "dependency slow"): _v(WAIT, "no answer within REQUEST_TIMEOUT_S for any "
                                                 "record"),
    ("bridge call", "not its protocol"): _v(WAIT, "a 200 that is no prediction per record, for "
                                                  "every record"),
    ("bridge call", "auth/ACL refused"): _v(STOP, "401/403, another 4xx (a wrong endpoint)"),
    ("bridge call", "missing library or codec"): _v(NA, "the bridge sends JSON; the server's "
                                                        "libraries are its own"),
    ("bridge call", "resource bound exceeded"): _v(DL, "a batch too large (413) is asked "
                                                       "record by record; a record too large "
                                                       "alone is its dead letter"),
    ("bridge call", "signal"): _SIGNAL,
    ("bridge call", "fenced"): _FENCED_AT_COMMIT,
    ("bridge call", "environment drift"): _v(NA, "the server's model is checked where it "
                                                     "loads (mlflow models serve)"),
    # ---- encode: records to bytes
    ("encode", "bad record"): _v(DL, "an output that does not fit its format: stage encode"),
    ("encode", "dependency down"): _v(NA, _NO_DEPENDENCY + " (the registry is its own)"),
    ("encode", "dependency slow"): _v(NA, _NO_DEPENDENCY),
    ("encode", "not its protocol"): _v(NA, _NO_DEPENDENCY),
    ("encode", "auth/ACL refused"): _v(NA, _NO_DEPENDENCY),
    ("encode", "missing library or codec"): _v(NA, "JSON and Avro writers are in the core "
                                                   "install"),
    ("encode", "resource bound exceeded"): _v(NA, "an output's size is judged when it is "
                                                  "produced"),
    ("encode", "signal"): _SIGNAL,
    ("encode", "fenced"): _FENCED_AT_COMMIT,
    ("encode", "environment drift"): _NO_MODEL_CODE,
    # ---- schema registry out: confluent-avro output
    ("schema registry out", "bad record"): _v(NA, "the output schema is the model's, not a "
                                                  "record's"),
    ("schema registry out", "dependency down"): _v(WAIT, "at start-up too"),
    ("schema registry out", "dependency slow"): _v(WAIT, "no answer within the client's "
                                                         "timeout"),
    ("schema registry out", "not its protocol"): _v(WAIT, "an answer that is no registry's"),
    ("schema registry out", "auth/ACL refused"): _v(STOP, "401/403, or the schema refused as "
                                                          "incompatible (409/422)"),
    ("schema registry out", "missing library or codec"): _v(REFUSE, "confluent-kafka's "
                                                                    "schemaregistry extra"),
    ("schema registry out", "resource bound exceeded"): _v(NA, "one schema, registered once"),
    ("schema registry out", "signal"): _SIGNAL,
    ("schema registry out", "fenced"): _FENCED_AT_COMMIT,
    ("schema registry out", "environment drift"): _NO_MODEL_CODE,
    # ---- produce output
    ("produce output", "bad record"): _v(DL, "a delivery error about the record (invalid, too "
                                             "large): stage produce, the broker's code"),
    ("produce output", "dependency down"): _v(WAIT, "sent again, input paused, nothing "
                                                    "committed until delivered"),
    ("produce output", "dependency slow"): _v(WAIT, "a delivery past message.timeout.ms: sent "
                                                    "again"),
    ("produce output", "not its protocol"): _v(NA, "librdkafka speaks Kafka; the broker's codes "
                                                   "are sorted (streaming/delivery.py)"),
    ("produce output", "auth/ACL refused"): _v(STOP, "the output topic refuses this client: "
                                                     "exit 2, nothing committed, no dead "
                                                     "letters"),
    ("produce output", "missing library or codec"): _v(NA, "librdkafka is the core install"),
    ("produce output", "resource bound exceeded"): _v(DL, "an output over message.max.bytes: "
                                                          "its input dead-lettered, truncated "
                                                          "if need be"),
    ("produce output", "signal"): _v(Outcome.FINISH, "delivered within SHUTDOWN_TIMEOUT_S, "
                                                     "else uncommitted; exit 0"),
    ("produce output", "fenced"): _FENCED_AT_COMMIT,
    ("produce output", "environment drift"): _NO_MODEL_CODE,
    # ---- produce dead letter
    ("produce dead letter", "bad record"): _v(DL, "a dead letter the broker refuses for size: "
                                                  "sent as headers only"),
    ("produce dead letter", "dependency down"): _v(WAIT, "sent again, as outputs are"),
    ("produce dead letter", "dependency slow"): _v(WAIT, "sent again, as outputs are"),
    ("produce dead letter", "not its protocol"): _v(NA, "as produce output"),
    ("produce dead letter", "auth/ACL refused"): _v(STOP, "the dead-letter topic refuses this "
                                                          "client: exit 2, uncommitted"),
    ("produce dead letter", "missing library or codec"): _v(NA, "librdkafka is the core "
                                                                "install"),
    ("produce dead letter", "resource bound exceeded"): _v(DL, "truncated to the limit, with "
                                                               "its size and digest"),
    ("produce dead letter", "signal"): _SIGNAL,
    ("produce dead letter", "fenced"): _FENCED_AT_COMMIT,
    ("produce dead letter", "environment drift"): _NO_MODEL_CODE,
    # ---- commit
    ("commit", "bad record"): _v(NA, "commits carry offsets, no record"),
    ("commit", "dependency down"): _v(WAIT, "a commit that fails is retried with the next"),
    ("commit", "dependency slow"): _v(WAIT, "a commit that fails is retried with the next; "
                                            "exactly-once: resumed until the transaction "
                                            "timeout, then aborted and its input read again"),
    ("commit", "not its protocol"): _v(NA, "librdkafka speaks Kafka"),
    ("commit", "auth/ACL refused"): _v(STOP, "the group or the input topic refused: exit 2"),
    ("commit", "missing library or codec"): _v(NA, "librdkafka is the core install"),
    ("commit", "resource bound exceeded"): _v(NA, "offsets are small"),
    ("commit", "signal"): _v(Outcome.FINISH, "what was delivered is committed, then exit 0"),
    ("commit", "fenced"): _v(Outcome.ABORT, "exactly-once: the coordinator refuses a zombie's offsets "
                                  "(KIP-447), its transaction is aborted, none of it visible; "
                                  "at-least-once: its commit is refused, its outputs stay"),
    ("commit", "environment drift"): _NO_MODEL_CODE,
    # ---- file write: run's outputs and rejects
    ("file write", "bad record"): _v(DL, "a record the output format cannot hold: a reject, "
                                         "stage encode"),
    ("file write", "dependency down"): _v(STOP, "the output's folder missing: one line, before "
                                                "any work"),
    ("file write", "dependency slow"): _v(NA, "a slow file system is only slow"),
    ("file write", "not its protocol"): _v(NA, "a file has no protocol"),
    ("file write", "auth/ACL refused"): _v(STOP, "the folder refuses writes: one line, before "
                                                 "any work"),
    ("file write", "missing library or codec"): _v(NA, "the writers are in the core install"),
    ("file write", "resource bound exceeded"): _v(NA, "a full disk is a write error: the run "
                                                      "stops, the old output kept"),
    ("file write", "signal"): _v(Outcome.FINISH, "nothing replaced: outputs are renamed into "
                                                 "place only when the run ends"),
    ("file write", "fenced"): _v(NA, "run writes files, in no consumer group"),
    ("file write", "environment drift"): _NO_MODEL_CODE,
    # ---- replay: dlq replay [--through MODEL]
    ("replay", "bad record"): _v(DL, "a dead letter that fails again through the model stays "
                                     "where it is, reported"),
    ("replay", "dependency down"): _v(STOP, "the replay stops naming it; what it had not sent "
                                            "is not recorded as replayed"),
    ("replay", "dependency slow"): _v(STOP, "as dependency down"),
    ("replay", "not its protocol"): _v(NA, "as the stream's boundaries"),
    ("replay", "auth/ACL refused"): _v(NA, "as the stream's produce boundaries"),
    ("replay", "missing library or codec"): _v(NA, "as the stream's decode boundary"),
    ("replay", "resource bound exceeded"): _v(NA, "dead letters were bounded when written"),
    ("replay", "signal"): _v(NA, "each replay transaction commits or aborts whole"),
    ("replay", "fenced"): _v(STOP, "a second replay of the same topic fences the first: it "
                                  "stops, what it committed recorded as replayed"),
    ("replay", "environment drift"): _v(REFUSE, "--through a model that drifted: refused "
                                                "before a dead letter is read"),
}


def cells() -> list[tuple[str, str]]:
    """Every (boundary, fault) pair, in the table's order."""
    return [(b, f) for b in BOUNDARIES for f in FAULTS]


def table_markdown(tests: dict[tuple[str, str], list[str]] | None = None) -> str:
    """The table of docs/concepts.md: a row per boundary and fault class, its outcome, what
    it means there, and the tests that show it (``tests``: cell -> test names)."""
    rows = ["| boundary | fault | outcome | what happens | tests |", "|---|---|---|---|---|"]
    for cell in cells():
        verdict = TABLE[cell]
        shown = ", ".join(f"`{t}`" for t in (tests or {}).get(cell, []))
        rows.append(f"| {cell[0]} | {cell[1]} | {verdict.outcome.value} | {verdict.note} | "
                    f"{shown} |")
    return "\n".join(rows)
