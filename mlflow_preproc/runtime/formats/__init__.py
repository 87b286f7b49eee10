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
"""

from __future__ import annotations

import io
import itertools
import json
import struct
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import fastavro
from orjson import loads  # strict and fast; its errors are ValueErrors

from mlflow_preproc.config import MAX_DECODED_BYTES_DEFAULT
from mlflow_preproc.runtime.avro_binary import advance, skip_sized, zigzag
from mlflow_preproc.runtime.avro_codecs import CODECS, inflate
from mlflow_preproc.runtime.avro_bounds import (
    MAX_SCHEMA_TEXT_BYTES,
    ValuesOverBound,
    amplifies,
    max_values,
    value_walker,
    zero_width,
)
from mlflow_preproc.runtime.avro_schemas import SchemaError, load_avro_schema
from mlflow_preproc.runtime.dependencies import Misconfigured, Unavailable
from mlflow_preproc.runtime.input_fields import Tree, reader_schema
from mlflow_preproc.runtime.jsonable import dumps
from mlflow_preproc.runtime.model_input import scoring_records
from mlflow_preproc.secrets import redact_url
from mlflow_preproc.runtime.formats.base import (  # noqa: F401
    Record,
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    DecodeError,
    BlockTooLarge,
    EncodeError,
    drop_fields,
    _without,
)
from mlflow_preproc.runtime.formats.avro_records import (  # noqa: F401
    _RecordReader,
    Skipper,
    _plan_steps,
    _run_schema,
    _by_name,
    _skipper,
    _FIXED_WIDTH,
    _count_skipper,
    _block_skipper,
)
from mlflow_preproc.runtime.formats.avro_container import (  # noqa: F401
    OCF_MAGIC,
    OCF_HEADER_SCHEMA,
    _ContainerReader,
    read_header,
    _HEADER_ROOM,
    _Bounded,
    _next_block,
    _check_consumed,
    _read_long,
    _step_over,
    BlockReader,
    _AHEAD_RECORDS,
    _AHEAD_BYTES,
    _avro_file,
    _decoded_blocks,
    _Start,
    _FILE_READERS,
    _MAX_FILE_READERS,
    _file_reader,
    _damaged,
)
from mlflow_preproc.runtime.formats.schema_registry import (  # noqa: F401
    _SchemaById,
    _registry_client_class,
    _NOT_FOUND,
    _registry_failure,
)
from mlflow_preproc.runtime.formats.messages import (  # noqa: F401
    _CONFLUENT_MAGIC,
    MessageDecoder,
    _json_value,
    _json_object,
    _schemaless,
    MessageEncoder,
)
from mlflow_preproc.runtime.formats.json_files import (  # noqa: F401
    _MAX_SPREAD_BYTES,
    _json_lines,
    _items,
    _never_ends,
    _is_object_line,
    _UNFINISHED,
    _parse,
    _lines,
    _peek_nonspace,
    _json_array,
    _Recording,
    _Replayed,
)
from mlflow_preproc.runtime.formats.files import (  # noqa: F401
    UNKNOWN_FORMAT,
    sniff_file_format,
    read_records,
    FileWriter,
)

