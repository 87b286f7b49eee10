"""The schemas of the Confluent wire format by id: local ``<id>.avsc`` files, else a Schema
Registry, whose errors are sorted by whose fault they are."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro

from mlflow_preproc.runtime.avro_schemas import SchemaError, load_avro_schema
from mlflow_preproc.runtime.dependencies import Misconfigured, Unavailable
from mlflow_preproc.runtime.formats.base import DecodeError
from mlflow_preproc.secrets import redact_url

class _SchemaById:
    """Schemas of the Confluent wire format: local ``<id>.avsc`` files, else the registry.

    Only an id the registry does not know is the record's fault (a :class:`DecodeError`, so a
    dead letter). A registry that is down, slow or failing is
    :class:`~mlflow_preproc.runtime.dependencies.Unavailable` (the stream waits for it), one
    that refuses this client :class:`~mlflow_preproc.runtime.dependencies.Misconfigured`.
    Schema references (a schema using types registered under other subjects) are resolved.
    """

    def __init__(self, schema_dir: str | None, registry_url: str | None,
                 registry_config: dict | None):
        self._dir = Path(schema_dir) if schema_dir else None
        self._registry_url = registry_url
        self._shown_url = redact_url(registry_url or "")  # what messages may say
        # The stream retries with its own backoff while polling the group; the client's own
        # retries would only block the loop longer.
        self._registry_config = {"max.retries": 1, "timeout": 10, **(registry_config or {})}
        self._client = None
        self._cache: dict[int, dict] = {}
        if registry_url:
            _registry_client_class()  # a missing extra is a start-up error, not a dead letter

    def get(self, schema_id: int) -> dict:
        if schema_id not in self._cache:
            schema, named = self._fetch(schema_id)
            try:
                self._cache[schema_id] = fastavro.parse_schema(schema, named_schemas=named)
            except Exception as exc:  # noqa: BLE001 -- fastavro's schema errors have no base
                raise DecodeError(f"schema id {schema_id} cannot be used "
                                  f"({type(exc).__name__}: {exc}); define every named type it "
                                  "uses in it, or put the defining .avsc files beside it"
                                  ) from None
        return self._cache[schema_id]

    def _fetch(self, schema_id: int) -> tuple[dict, dict]:
        """The schema of ``schema_id`` and the named types of the schemas it references."""
        if self._dir and (self._dir / f"{schema_id}.avsc").is_file():
            try:
                return load_avro_schema(self._dir / f"{schema_id}.avsc"), {}
            except SchemaError as exc:
                raise DecodeError(f"schema id {schema_id}: {exc}") from None
        if not self._registry_url:
            raise DecodeError(f"no schema with id {schema_id}: add {schema_id}.avsc to "
                              f"{self._dir} or set SCHEMA_REGISTRY_URL")
        what = f"schema id {schema_id}"
        schema = self._ask(what, lambda client: client.get_schema(schema_id))
        named: dict = {}
        self._resolve(schema.references, named, what)
        return self._json(schema.schema_str, what), named

    def _resolve(self, references: list, named: dict, what: str, depth: int = 0) -> None:
        """Parse the referenced schemas, depth first, into ``named``."""
        if depth > 32:
            raise DecodeError(f"{what}: its schema references nest deeper than 32 levels")
        for ref in references or []:
            where = f"{what}: reference {ref.name} ({ref.subject} version {ref.version})"
            registered = self._ask(where, lambda client: client.get_version(ref.subject,
                                                                            ref.version))
            self._resolve(registered.schema.references, named, where, depth + 1)
            try:
                fastavro.parse_schema(self._json(registered.schema.schema_str, where),
                                      named_schemas=named)
            except Exception as exc:  # noqa: BLE001 -- fastavro's schema errors have no base
                raise DecodeError(f"{where} cannot be used ({type(exc).__name__}: {exc})"
                                  ) from None

    def _ask(self, what: str, request: Callable):
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            return request(self._registry())
        except SchemaRegistryError as exc:
            raise _registry_failure(exc, what, self._shown_url) from None
        except Exception as exc:  # noqa: BLE001 -- httpx's transport errors, timeouts...
            raise Unavailable("schema registry", redact_url(
                f"{self._shown_url}: {type(exc).__name__}: {exc}", self._registry_url)) from None

    def ask_register(self, subject: str, schema: Any) -> int:
        """Register ``schema`` under ``subject``; its id. The registry refusing it (an
        incompatible change, 409/422) is a configuration to fix, not a record's fault."""
        what = f"the output schema under {subject}"
        try:
            return self._ask(what, lambda client: client.register_schema(subject, schema))
        except DecodeError as exc:
            raise Misconfigured(str(exc)) from None

    @staticmethod
    def _json(text: str, what: str) -> dict:
        try:
            return json.loads(text)
        except ValueError as exc:
            raise DecodeError(f"{what}: the registry's schema is not JSON ({exc})") from None

    def _registry(self):
        if self._client is None:
            self._client = _registry_client_class()({"url": self._registry_url,
                                                     **self._registry_config})
        return self._client


def _registry_client_class() -> type:
    try:
        from confluent_kafka.schema_registry import SchemaRegistryClient
    except ImportError as exc:  # authlib, httpx: confluent-kafka's schemaregistry extra
        raise ValueError(f"SCHEMA_REGISTRY_URL needs confluent-kafka's schemaregistry extra "
                         f"({exc}); pip install 'confluent-kafka[schemaregistry]', or log "
                         "the model with pip_requirements=['confluent-kafka[schemaregistry]'] "
                         "for an image") from None
    return SchemaRegistryClient


# The registry's own error codes for "no such schema / subject / version".
_NOT_FOUND = {40401, 40402, 40403}


def _registry_failure(exc, what: str, url: str) -> Exception:
    """Sort a registry's error answer: unknown id (the record's), refused client (ours), or
    a registry not answering well now (the environment's)."""
    status = exc.http_status_code
    if status == 404 and exc.error_code in _NOT_FOUND:
        return DecodeError(f"{what} not found in the registry at {url} ({exc.error_message})")
    if status in (401, 403):
        return Misconfigured(f"the schema registry at {url} refused this client with HTTP "
                             f"{status} ({exc.error_message}); give the stream credentials "
                             "it accepts (basic.auth.user.info...) or check SCHEMA_REGISTRY_URL")
    if status in (409, 422):
        return Misconfigured(f"the schema registry at {url} refused {what} with HTTP {status} "
                             f"({exc.error_message}); make the schema compatible with the "
                             "subject's versions, or change the subject's compatibility")
    if 400 <= status < 500 and status not in (408, 425, 429):
        return Misconfigured(f"the schema registry at {url} answered HTTP {status} to a "
                             f"request for {what} ({exc.error_message}); check "
                             "SCHEMA_REGISTRY_URL (it names the registry's base URL)")
    return Unavailable("schema registry", f"{url}: HTTP {status} ({exc.error_message})")
