"""Every model round-trips through fastavro, and every model agrees with its .avsc field by field."""

from __future__ import annotations

import io
import json
import typing
from datetime import UTC, datetime

import fastavro
import pytest
from pydantic import BaseModel

from infra import topics
from schemas import models
from schemas.codec import MAGIC, DecodeError
from schemas.config import Campaign, Channel, Template, Trigger
from schemas.contracts import CODECS, RAW_SCHEMAS, TOPIC_VALUES, codec, encode

pytestmark = pytest.mark.unit

T = datetime(2026, 11, 24, 8, 30, 15, 123000, tzinfo=UTC)
SAMPLES: list[BaseModel] = [
    models.Event(
        event_id="e1",
        event_type="cart_abandoned",
        user_id="u1",
        occurred_at=T,
        properties={"sku": "p-1", "qty": 2, "price": 9.5, "gift": False, "note": None},
    ),
    models.MatchedMessage(
        message_id="m1",
        campaign_id="c1",
        user_id="u1",
        event_id="e1",
        event_type="t",
        channel="webhook",
        priority=models.Priority.high,
        triggered_at=T,
        properties={"a": "b"},
    ),
    models.RenderedMessage(
        message_id="m1",
        campaign_id="c1",
        user_id="u1",
        channel="webhook",
        priority=models.Priority.low,
        triggered_at=T,
        address="u1",
        title=None,
        body="你好 👋🏽",
        link="http://x/c/t",
    ),
    models.Outcome(
        message_id="m1",
        campaign_id="c1",
        user_id="u1",
        channel="webhook",
        code=models.OutcomeCode.capped,
        stage="throttle",
        reason="cap",
        triggered_at=T,
        occurred_at=T,
    ),
    models.DeadLetter(
        stage="match",
        topic="loopcast.events",
        partition=3,
        offset=42,
        reason="bad",
        error_type="DecodeError",
        key=None,
        original=b"\x00\xff",
        occurred_at=T,
    ),
    models.Alert(
        alert_id="a1",
        kind="delivery_rate_drop",
        severity=models.Severity.critical,
        subject="webhook",
        message="dropped",
        value=0.42,
        occurred_at=T,
    ),
    models.ConfigRecord(kind=models.ConfigKind.template, id="t1", version=3, body="{}"),
    models.TagChange(
        user_id="u1", tag="price_sensitive", change=models.TagChangeKind.added, source="r1", occurred_at=T
    ),
]

AVRO_TO_PY = {"string": str, "long": int, "int": int, "double": float, "boolean": bool, "bytes": bytes}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(sample: BaseModel) -> None:
    data = encode(sample)
    assert data[:2] == MAGIC
    assert codec(type(sample)).decode(data) == sample


def test_every_model_has_a_sample_and_every_topic_a_model() -> None:
    assert {type(s) for s in SAMPLES} == set(CODECS)
    assert {t.name for t in topics.ALL} == set(TOPIC_VALUES)


def _py_type(avro_type, named: dict) -> object:
    if isinstance(avro_type, list):
        return tuple(sorted(str(_py_type(t, named)) for t in avro_type))
    if isinstance(avro_type, dict):
        if avro_type.get("logicalType") == "timestamp-millis":
            return datetime
        if avro_type["type"] == "enum":
            named[avro_type["name"]] = avro_type
            return ("enum", tuple(avro_type["symbols"]))
        if avro_type["type"] == "map":
            return ("map", _py_type(avro_type["values"], named))
        if avro_type["type"] == "array":
            return ("array", _py_type(avro_type["items"], named))
        return _py_type(avro_type["type"], named)
    if avro_type == "null":
        return type(None)
    if avro_type in AVRO_TO_PY:
        return AVRO_TO_PY[avro_type]
    short = avro_type.rsplit(".", 1)[-1]
    return ("enum", tuple(named[short]["symbols"]))


def _model_type(annotation) -> object:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, __import__("types").UnionType):
        return tuple(sorted(str(_model_type(a)) for a in typing.get_args(annotation)))
    if origin is dict:
        return ("map", _model_type(typing.get_args(annotation)[1]))
    if origin is list:
        return ("array", _model_type(typing.get_args(annotation)[0]))
    if isinstance(annotation, type) and issubclass(annotation, models.StrEnum):
        return ("enum", tuple(m.value for m in annotation))
    return annotation


def test_models_agree_with_avsc() -> None:
    named: dict = {}
    for model, raw in RAW_SCHEMAS.items():
        avro_fields = {f["name"]: f for f in raw["fields"]}
        assert list(avro_fields) == list(model.model_fields), model.__name__
        for name, field in model.model_fields.items():
            assert _py_type(avro_fields[name]["type"], named) == _model_type(field.annotation), (
                f"{model.__name__}.{name}"
            )
            has_default = "default" in avro_fields[name]
            assert has_default == (not field.is_required()) or name == "occurred_at", f"{model.__name__}.{name}"


BAD = [
    (b"", "empty"),
    (b"\x00\x01\x02", "not Avro"),
    (b"\xc3\x01" + b"\x00" * 8 + b"x", "unknown schema fingerprint"),
    (b"{not json", "invalid JSON"),
    (b'{"event_type": "x"}', "event_id: Field required"),
    (b'{"event_id": "e", "event_type": "x", "user_id": "u", "occurred_at": "yesterday"}', "occurred_at"),
]


@pytest.mark.parametrize(("data", "reason"), BAD)
def test_bad_events_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        codec(models.Event).decode(data, allow_json=True)


def test_truncated_avro_body() -> None:
    data = encode(SAMPLES[0])
    with pytest.raises(DecodeError, match="corrupt Avro body"):
        codec(models.Event).decode(data[:-5])


def test_json_events_are_accepted_and_naive_times_are_utc() -> None:
    event = codec(models.Event).decode(
        json.dumps({"event_id": "e", "event_type": "x", "user_id": "u", "occurred_at": "2026-01-02T03:04:05"}).encode(),
        allow_json=True,
    )
    assert event.occurred_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_config_documents_round_trip_through_records() -> None:
    from schemas.config import parse_document

    for doc in (
        Campaign(id="c", name="C", trigger=Trigger(event_type="t"), channel="webhook", template_id="t1"),
        Template(id="t1", body="hi {{ name }}"),
        Channel(id="webhook", provider="webhook", url="http://127.0.0.1:1/x"),
    ):
        record = codec(models.ConfigRecord).decode(encode(doc.to_record()))
        assert parse_document(record) == doc


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_a_trusted_record_is_the_same_model_as_a_validated_one(sample: BaseModel) -> None:
    data = encode(sample)
    taken = codec(type(sample)).decode(data, trusted=True)
    assert taken == sample and type(taken) is type(sample)
    assert taken.model_dump() == sample.model_dump()
    assert encode(taken) == data
    # Enum fields are the enums, as validation would make them.
    for name, value in sample:
        assert type(getattr(taken, name)) is type(value)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_the_bytes_are_standard_avro_for_other_readers(sample: BaseModel) -> None:
    """Timestamps go through fastavro as plain longs and are converted by the codec: any other Avro
    library, reading with the .avsc's timestamp-millis, must still get the same record."""
    data = encode(sample)
    schema = codec(type(sample)).schema
    record = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, None)
    assert type(sample).model_validate(record) == sample
    written = io.BytesIO()
    fastavro.schemaless_writer(written, schema, sample.model_dump(mode="python"))
    assert data[10:] == written.getvalue()


@pytest.mark.parametrize(
    "when",
    [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
        datetime(2026, 12, 4, 21, 12, 30, 673000, tzinfo=UTC),
        datetime(2109, 6, 1, 0, 0, 0, 1000, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
    ],
)
def test_timestamps_keep_their_milliseconds_from_year_1_to_9999(when: datetime) -> None:
    event = models.Event(event_id="e", event_type="x", user_id="u", occurred_at=when)
    assert codec(models.Event).decode(encode(event)).occurred_at == when
    assert codec(models.Event).decode(encode(event), trusted=True).occurred_at == when


def test_an_assembled_outcome_is_the_validated_one() -> None:
    message = next(s for s in SAMPLES if isinstance(s, models.RenderedMessage))
    outcome = models.Outcome.of(
        message, models.OutcomeCode.sent, "dispatch", provider="webhook", provider_message_id="w-1", attempt=2
    )
    assert list(outcome.__dict__) == list(models.Outcome.model_fields)  # in the model's order, every field
    assert models.Outcome.model_validate(outcome.model_dump()) == outcome
    assert outcome.occurred_at.tzinfo is UTC and not outcome.occurred_at.microsecond % 1000
    assert codec(models.Outcome).decode(encode(outcome)) == outcome
