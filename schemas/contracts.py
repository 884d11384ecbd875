"""Binds each topic to its value model and each model to its Avro schema and codec."""

from __future__ import annotations

import json
from pathlib import Path

import fastavro

from infra import topics
from schemas import models
from schemas.codec import AvroCodec

AVRO_DIR = Path(__file__).parent / "avro"

# Order matters: later schemas refer to named types (Priority) defined by earlier ones.
SCHEMA_FILES: dict[type, str] = {
    models.Event: "event.avsc",
    models.MatchedMessage: "matched_message.avsc",
    models.RenderedMessage: "rendered_message.avsc",
    models.Outcome: "outcome.avsc",
    models.DeadLetter: "dead_letter.avsc",
    models.Alert: "alert.avsc",
    models.ConfigRecord: "config_record.avsc",
    models.TagChange: "tag_change.avsc",
}


def _load() -> tuple[dict[type, dict], dict[type, AvroCodec]]:
    named: dict = {}
    schemas, codecs = {}, {}
    for model, filename in SCHEMA_FILES.items():
        raw = json.loads((AVRO_DIR / filename).read_text())
        parsed = fastavro.parse_schema(raw, named_schemas=named)
        schemas[model] = raw
        codecs[model] = AvroCodec(model, parsed)
    return schemas, codecs


RAW_SCHEMAS, CODECS = _load()

TOPIC_VALUES: dict[str, type] = {
    topics.EVENTS.name: models.Event,
    topics.MATCHED.name: models.MatchedMessage,
    topics.RENDERED.name: models.RenderedMessage,
    **{spec.name: models.RenderedMessage for spec in topics.DISPATCH.values()},
    topics.OUTCOMES.name: models.Outcome,
    topics.DLQ.name: models.DeadLetter,
    topics.ALERTS.name: models.Alert,
    topics.CONFIG.name: models.ConfigRecord,
    topics.TAG_CHANGES.name: models.TagChange,
}


def codec(model: type) -> AvroCodec:
    return CODECS[model]


def encode(value) -> bytes:
    return CODECS[type(value)].encode(value)
