"""Record formats: bytes in -> records, records -> bytes out. Used by every mode.

Input formats
=============
``json``            one JSON object per Kafka message; in files, one object or an array of them
``jsonl``           files: one JSON object per line (also accepted for ``json`` files)
``avro``            Kafka: an Avro object container (the schema travels in the message, as in
                    the ZTF/Fink alert streams), or else schemaless Avro decoded with the
                    configured schema; files: Avro object container files
``confluent-avro``  Kafka: the Confluent wire format (byte 0, 4-byte schema id, schemaless
                    Avro), schemas fetched from a Schema Registry URL or read from local
                    ``<id>.avsc`` files

Output formats
==============
``json``/``jsonl``  JSON objects (bytes as base64, NaN as null: see :mod:`mlflow_preproc.runtime.jsonable`)
``avro``            Kafka: schemaless Avro with the output schema; files: an object container
``confluent-avro``  Kafka: Confluent wire format, schema registered under ``<topic>-value``

Every decode error is a :class:`DecodeError` whose message names the problem and the fix, so
streams can send the record to the dead-letter topic with that reason.

Modules, one job each: ``base`` (the record type, the format names, the errors, field
dropping), ``avro_records`` (one record of a writer schema, the skipper), ``avro_container``
(containers' header and blocks, their codecs and bounds), ``schema_registry`` (Confluent
schemas by id), ``messages`` (Kafka message values), ``json_files`` (the incremental JSON
readers) and ``files`` (sniffing, reading and writing files).
"""

from __future__ import annotations

from mlflow_preproc.config import MESSAGE_FORMATS
from mlflow_preproc.runtime.formats.avro_container import OCF_HEADER_SCHEMA, OCF_MAGIC, read_header
from mlflow_preproc.runtime.formats.base import (
    FILE_FORMATS,
    BlockTooLarge,
    DecodeError,
    EncodeError,
    Record,
    drop_fields,
)
from mlflow_preproc.runtime.formats.files import (
    UNKNOWN_FORMAT,
    FileWriter,
    read_records,
    sniff_file_format,
)
from mlflow_preproc.runtime.formats.messages import MessageDecoder, MessageEncoder

# Imported from here before the package was split (avro_columns, tests, benchmarks): kept
# importable from here, not part of its interface.
from mlflow_preproc.runtime.avro_binary import zigzag  # noqa: F401
from mlflow_preproc.runtime.formats.avro_container import _next_block  # noqa: F401
from mlflow_preproc.runtime.formats.schema_registry import _registry_failure  # noqa: F401

__all__ = [
    "MESSAGE_FORMATS",
    "FILE_FORMATS",
    "OCF_MAGIC",
    "OCF_HEADER_SCHEMA",
    "UNKNOWN_FORMAT",
    "Record",
    "DecodeError",
    "BlockTooLarge",
    "EncodeError",
    "drop_fields",
    "MessageDecoder",
    "MessageEncoder",
    "read_header",
    "sniff_file_format",
    "read_records",
    "FileWriter",
]
