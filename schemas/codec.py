"""Wire format of every topic: Avro single-object encoding, with JSON accepted where producers need it.

Single-object encoding (Avro spec): 0xC3 0x01, the writer schema's CRC-64-AVRO fingerprint
(8 bytes, little-endian), then the Avro binary body. Readers resolve an older writer schema
against the current one, so schema changes stay backward compatible.
"""

from __future__ import annotations

import io
import json
from enum import Enum
from typing import TypeVar, get_args

import fastavro
from pydantic import BaseModel, ValidationError

from schemas.models import assemble, from_millis, to_millis

MAGIC = b"\xc3\x01"
_EMPTY = 0xC15D213AA4D7A795


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _crc_table()


def _is_millis(avro_type) -> bool:
    return isinstance(avro_type, dict) and avro_type.get("logicalType") == "timestamp-millis"


def _nests_models(annotation) -> bool:
    """Whether a field's type has a model anywhere in it (dumping turns those into dicts for Avro)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_nests_models(arg) for arg in get_args(annotation))


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint the Avro spec defines for schema identity."""
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


class DecodeError(ValueError):
    """Bytes that are not a valid value of the expected schema; the reason is fit for a dead letter."""


M = TypeVar("M", bound=BaseModel)


class AvroCodec:
    """Encodes and decodes one pydantic model class under its Avro schema."""

    def __init__(self, model: type[M], parsed_schema: dict, older: list[dict] | None = None) -> None:
        self.model = model
        self.schema = parsed_schema
        self.fingerprint = crc64_avro(fastavro.schema.to_parsing_canonical_form(parsed_schema).encode()).to_bytes(
            8, "little"
        )
        # What every record written with the current schema starts with.
        self.header = MAGIC + self.fingerprint
        # For trusted records: the enum fields (fastavro hands back their symbols as str).
        self._enums = [
            (name, f.annotation._value2member_map_)
            for name, f in model.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, Enum)
        ]
        # Fields fastavro would turn into dicts: without them, a value's own __dict__ is the record.
        self._flat = not any(_nests_models(f.annotation) for f in model.model_fields.values())
        # The current schema with its timestamps as plain longs, converted here: fastavro's conversion
        # was about 1 µs a timestamp, a sixth of reading an outcome, where this one is 0.2.
        self._times = tuple(f["name"] for f in parsed_schema["fields"] if _is_millis(f["type"]))
        # Named types it refers to are put in place too: fastavro looks a name up on every read.
        named = parsed_schema.get("__named_schemas", {})
        self._plain = {
            **parsed_schema,
            "fields": [
                {**f, "type": "long" if f["name"] in self._times else named.get(f["type"], f["type"])}
                if f["name"] in self._times or (isinstance(f["type"], str) and f["type"] in named)
                else f
                for f in parsed_schema["fields"]
            ],
        }
        # Writer schemas we can still read, by fingerprint (the current one first).
        self.writers: dict[bytes, dict] = {self.fingerprint: parsed_schema}
        for schema in older or []:
            fp = crc64_avro(fastavro.schema.to_parsing_canonical_form(schema).encode()).to_bytes(8, "little")
            self.writers[fp] = schema

    def encode(self, value: BaseModel) -> bytes:
        buf = io.BytesIO()
        buf.write(self.header)
        record = dict(value.__dict__) if self._flat else value.model_dump(mode="python")
        for name in self._times:
            record[name] = to_millis(record[name])
        fastavro.schemaless_writer(buf, self._plain, record)
        return buf.getvalue()

    def decode(self, data: bytes | None, *, allow_json: bool = False, trusted: bool = False) -> M:
        """`trusted`: the record was written by Loopcast's own stages from a validated model (never by
        an outside producer), so one in the current schema is taken as it is, without validating it
        again — Avro already checked every type, and validation was a third of a decode."""
        if not data:
            raise DecodeError("empty message")
        if data[:2] == MAGIC:
            writer = self.writers.get(bytes(data[2:10]))
            if writer is None:
                raise DecodeError(f"unknown schema fingerprint {bytes(data[2:10]).hex()} for {self.model.__name__}")
            try:
                if writer is self.schema:
                    record = fastavro.schemaless_reader(io.BytesIO(data[10:]), self._plain, None)
                    for name in self._times:
                        record[name] = from_millis(record[name])
                else:
                    record = fastavro.schemaless_reader(io.BytesIO(data[10:]), writer, self.schema)
            except Exception as exc:  # fastavro raises many types on truncated or corrupt bodies
                raise DecodeError(f"corrupt Avro body for {self.model.__name__}: {exc!r}") from exc
            if trusted and writer is self.schema:
                return self._taken(record)
            return self._validate(record)
        if allow_json and data.lstrip()[:1] == b"{":
            try:
                record = json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DecodeError(f"invalid JSON: {exc}") from exc
            return self._validate(record)
        expected = "Avro single-object or JSON" if allow_json else "Avro single-object encoding"
        raise DecodeError(f"not {expected} (first bytes {bytes(data[:4]).hex()})")

    def _taken(self, record: dict) -> M:
        """The model from a record of the current schema, as pydantic's model_construct builds it
        (every field present, no extras, no private attributes), without its per-field Python loop."""
        for name, members in self._enums:
            record[name] = members[record[name]]  # the writer's schema has no symbol the model lacks
        return assemble(self.model, record)

    def _validate(self, record: object) -> M:
        try:
            return self.model.model_validate(record)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5]
            )
            raise DecodeError(f"invalid {self.model.__name__}: {problems}") from exc
