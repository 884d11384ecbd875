"""The pydantic mirrors of the Avro schemas in schemas/avro: what travels on each topic.

A parametrised test checks that every model and its .avsc agree field by field.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Scalar = bool | int | float | str | None
Properties = dict[str, Scalar]


def to_utc_millis(value: datetime) -> datetime:
    """Naive times are taken as UTC; Avro timestamp-millis keeps milliseconds, so truncate to them."""
    if value.tzinfo is UTC and not value.microsecond % 1000:
        return value  # as every decoded record has it: nothing to do, on the hot path
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


Timestamp = Annotated[datetime, AfterValidator(to_utc_millis)]


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MS = timedelta(milliseconds=1)
# Below 2**42 ms (the years 1831-2109) a float's error in seconds stays under half a microsecond, so
# fromtimestamp's rounding to microseconds gives the exact milliseconds back.
_FLOAT_EXACT = 2**42


def to_millis(value: datetime) -> int:
    """Exact milliseconds since the epoch; a naive time is taken as UTC (as fastavro takes it)."""
    return ((value if value.tzinfo else value.replace(tzinfo=UTC)) - EPOCH) // ONE_MS


def from_millis(value: int) -> datetime:
    if -_FLOAT_EXACT < value < _FLOAT_EXACT:
        return datetime.fromtimestamp(value / 1000, UTC)  # a quarter of the cost of adding a timedelta
    return EPOCH + value * ONE_MS


def now_utc() -> datetime:
    return from_millis(time.time_ns() // 1_000_000)  # already whole milliseconds: no replace()


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


R = TypeVar("R", bound=BaseModel)


def assemble(model: type[R], values: dict) -> R:
    """A model from values that are already of its fields' types, every field present and in order (taken
    from validated models or trusted records): what model_construct builds, without its per-field loop,
    and without validating again (4 µs of an outcome's 5)."""
    value = model.__new__(model)
    _set = object.__setattr__
    _set(value, "__dict__", values)
    _set(value, "__pydantic_fields_set__", set(values))
    _set(value, "__pydantic_extra__", None)
    _set(value, "__pydantic_private__", None)
    return value


class Priority(StrEnum):
    high = "high"
    normal = "normal"
    low = "low"


class OutcomeCode(StrEnum):
    # Terminal: every message ends with exactly one of these.
    sent = "sent"
    failed = "failed"
    capped = "capped"
    render_failed = "render_failed"
    no_address = "no_address"
    deduplicated = "deduplicated"
    opted_out = "opted_out"
    expired = "expired"
    # Lifecycle after `sent`: receipts and engagement.
    delivered = "delivered"
    undelivered = "undelivered"
    clicked = "clicked"
    converted = "converted"
    # Before a terminal code: held until quiet hours end; the real outcome follows.
    deferred = "deferred"
    # Before a terminal code: an attempt at a provider failed and another follows (same or other provider).
    retrying = "retrying"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_CODES


TERMINAL_CODES = frozenset(
    {
        OutcomeCode.sent,
        OutcomeCode.failed,
        OutcomeCode.capped,
        OutcomeCode.render_failed,
        OutcomeCode.no_address,
        OutcomeCode.deduplicated,
        OutcomeCode.opted_out,
        OutcomeCode.expired,
    }
)


class Severity(StrEnum):
    info = "info"
    warning = "warning"
    critical = "critical"


class ConfigKind(StrEnum):
    campaign = "campaign"
    template = "template"
    channel = "channel"
    segment = "segment"
    tag_rule = "tag_rule"


# An event of this type updates the user's profile with its properties (attributes, addresses):
# bulk loads and live updates take the same path (streams.feedback).
PROFILE_UPDATED = "profile_updated"


class Event(Record):
    event_id: str = Field(min_length=1, max_length=200)
    event_type: str = Field(min_length=1, max_length=100)
    user_id: str = Field(min_length=1, max_length=200)
    occurred_at: Timestamp
    properties: Properties = Field(default_factory=dict)


class MatchedMessage(Record):
    message_id: str
    campaign_id: str
    user_id: str
    event_id: str
    event_type: str
    channel: str
    priority: Priority
    triggered_at: Timestamp
    properties: Properties = Field(default_factory=dict)
    variant: str | None = None
    fallback_of: str | None = None


class RenderedMessage(Record):
    message_id: str
    campaign_id: str
    user_id: str
    channel: str
    priority: Priority
    triggered_at: Timestamp
    address: str
    title: str | None = None
    body: str
    link: str | None = None
    variant: str | None = None
    html: str | None = None
    image_url: str | None = None
    extra: str | None = None
    attempt: int = 1
    failed_providers: list[str] = Field(default_factory=list)
    fallback_of: str | None = None
    # The product whose live stock the copy quotes: once it sells out, the throttle suppresses the message.
    inventory_product: str | None = None


class Outcome(Record):
    message_id: str
    campaign_id: str
    user_id: str
    channel: str
    code: OutcomeCode
    stage: str
    reason: str | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    triggered_at: Timestamp
    occurred_at: Timestamp = Field(default_factory=now_utc)
    variant: str | None = None
    attempt: int | None = None
    fallback_of: str | None = None

    @classmethod
    def of(
        cls,
        message: MatchedMessage | RenderedMessage,
        code: OutcomeCode,
        stage: str,
        reason: str | None = None,
        *,
        provider: str | None = None,
        provider_message_id: str | None = None,
        attempt: int | None = None,
    ) -> Outcome:
        """The outcome of a message at a stage: the one way every stage reports what happened. Assembled,
        not validated: the message is a validated model and the rest is the stage's own values (one is
        made per message at every stage; a wrong type still fails, when the outcome is encoded)."""
        return assemble(
            cls,
            {
                "message_id": message.message_id,
                "campaign_id": message.campaign_id,
                "user_id": message.user_id,
                "channel": message.channel,
                "code": code,
                "stage": stage,
                "reason": reason,
                "provider": provider,
                "provider_message_id": provider_message_id,
                "triggered_at": message.triggered_at,
                "occurred_at": now_utc(),
                "variant": message.variant,
                "attempt": attempt,
                "fallback_of": message.fallback_of,
            },
        )


class DeadLetter(Record):
    stage: str
    topic: str
    partition: int
    offset: int
    reason: str
    error_type: str
    key: bytes | None = None
    original: bytes
    occurred_at: Timestamp = Field(default_factory=now_utc)


class Alert(Record):
    alert_id: str
    kind: str
    severity: Severity
    subject: str
    message: str
    value: float | None = None
    occurred_at: Timestamp = Field(default_factory=now_utc)


class TagChangeKind(StrEnum):
    added = "added"
    removed = "removed"


class TagChange(Record):
    user_id: str
    tag: str
    change: TagChangeKind
    source: str
    occurred_at: Timestamp = Field(default_factory=now_utc)


class ConfigRecord(Record):
    kind: ConfigKind
    id: str
    version: int
    body: str
