"""The segment language: a typed tree of conditions on a user's attributes, tags, events and
packages. One definition, evaluated in real time (streams.segments) and compiled to SQL for
ClickHouse and Spark (connectors.segment_sql); every node's docstring is the contract all three follow.

Common rules:
- Times are instants: every datetime is timezone-aware and is compared and shifted in UTC, so a
  window is elapsed time (a day is 24 hours, whatever a local clock did meanwhile).
- A missing attribute (absent or None) makes every `attribute` / `attribute_within` leaf false,
  `!=` and `exists` included. `not` is plain boolean negation of its child's result, so
  `not(age > 30)` holds for a user without an age.
- Event windows ending at `now` include `now` and exclude their start: (now - window, now].
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class AttributeType(StrEnum):
    INT = "int"
    FLOAT = "float"
    STR = "str"
    DATETIME = "datetime"


# The only attribute names a segment may use; they are also the only column names the SQL compiler
# emits, so nothing a segment author writes ever becomes an identifier.
ATTRIBUTES: dict[str, AttributeType] = {
    "age": AttributeType.INT,
    "city": AttributeType.STR,
    "country": AttributeType.STR,
    "vip_level": AttributeType.INT,
    "gender": AttributeType.STR,
    "membership_expires_at": AttributeType.DATETIME,
    "last_login_at": AttributeType.DATETIME,
    "signup_at": AttributeType.DATETIME,
    "timezone": AttributeType.STR,
    "lifetime_value": AttributeType.FLOAT,
}

Op = Literal["=", "!=", "<", ">", "<=", ">=", "in", "between", "exists"]
ORDERED_OPS: frozenset[str] = frozenset({"<", ">", "<=", ">=", "between"})
ORDERED_TYPES: frozenset[AttributeType] = frozenset({AttributeType.INT, AttributeType.FLOAT, AttributeType.DATETIME})
TimeUnit = Literal["minutes", "hours", "days"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Longer windows are almost surely mistakes, and bounding them keeps now ± window inside datetime.
MAX_WINDOW = dt.timedelta(days=3660)
MAX_DEPTH = 32

_STRICT_INT = TypeAdapter(StrictInt)
_NUMBER = TypeAdapter(StrictInt | StrictFloat)
_STRICT_STR = TypeAdapter(StrictStr)
_AWARE = TypeAdapter(AwareDatetime)


def attribute_type(name: str) -> AttributeType:
    """The whitelisted type of an attribute; a clear ValueError for any other name."""
    try:
        return ATTRIBUTES[name]
    except KeyError:
        raise ValueError(f"unknown attribute {name!r}; segments may use: {', '.join(sorted(ATTRIBUTES))}") from None


def coerce_value(name: str, kind: AttributeType, value: Any) -> int | float | str | dt.datetime:
    """One value of attribute `name` as its declared type (datetimes aware, in UTC); ValueError otherwise.

    JSON carries datetimes as ISO 8601 text, so text is accepted for datetime attributes."""
    try:
        match kind:
            case AttributeType.INT:
                number = _STRICT_INT.validate_python(value)
                if not _INT64_MIN <= number <= _INT64_MAX:
                    raise ValueError(f"attribute {name!r} is a 64-bit integer; {number} is out of range")
                return number
            case AttributeType.FLOAT:
                real = float(_NUMBER.validate_python(value))
                if real != real or real in (float("inf"), float("-inf")):
                    raise ValueError(f"attribute {name!r} needs a finite number, not {real}")
                return real
            case AttributeType.STR:
                return _STRICT_STR.validate_python(value)
            case AttributeType.DATETIME:
                return _AWARE.validate_python(value).astimezone(dt.UTC)
    except ValidationError:
        pass
    raise ValueError(f"attribute {name!r} is of type {kind.value}; got {value!r} ({type(value).__name__})")


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Duration(BaseModel):
    """A length of elapsed time: `amount` `unit`s, a day being exactly 24 hours."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amount: int = Field(gt=0)
    unit: TimeUnit

    @model_validator(mode="after")
    def _bounded(self) -> Duration:
        if _delta(self.amount, self.unit) > MAX_WINDOW:
            raise ValueError(f"a duration may not exceed {MAX_WINDOW.days} days")
        return self

    @property
    def delta(self) -> dt.timedelta:
        return _delta(self.amount, self.unit)

    @property
    def minutes(self) -> int:
        return _minutes(self.amount, self.unit)


def _minutes(amount: int, unit: TimeUnit) -> int:
    return amount * {"minutes": 1, "hours": 60, "days": 1440}[unit]


def _delta(amount: int, unit: TimeUnit) -> dt.timedelta:
    return dt.timedelta(minutes=_minutes(amount, unit))


class HasTag(_Node):
    """The user carries `tag` (exact, case-sensitive match)."""

    type: Literal["has_tag"] = "has_tag"
    tag: str = Field(min_length=1)


class AttributeCondition(_Node):
    """Compare a whitelisted attribute with a literal.

    `=`, `!=`, `in` apply to every type; `<`, `>`, `<=`, `>=`, `between` only to int, float and
    datetime. `value` is one value of the attribute's type, a non-empty list for `in`, exactly
    [low, high] with low <= high for `between` (both ends included), and absent for `exists`.
    A missing attribute makes the condition false, whatever the operator.
    """

    type: Literal["attribute"] = "attribute"
    name: str
    op: Op
    value: Any = Field(default=None, validate_default=True)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        attribute_type(name)
        return name

    @field_validator("value")
    @classmethod
    def _typed(cls, value: Any, info: ValidationInfo) -> Any:
        name, op = info.data.get("name"), info.data.get("op")
        if name is None or op is None:  # already reported
            return value
        kind = ATTRIBUTES[name]
        if op in ORDERED_OPS and kind not in ORDERED_TYPES:
            raise ValueError(f"operator {op!r} needs an int, float or datetime attribute; {name!r} is {kind.value}")
        if op == "exists":
            if value is not None:
                raise ValueError("operator 'exists' takes no value")
            return None
        if op == "in":
            if not isinstance(value, list | tuple) or not value:
                raise ValueError(f"operator 'in' needs a non-empty list of {kind.value} values")
            return tuple(coerce_value(name, kind, v) for v in value)
        if op == "between":
            if not isinstance(value, list | tuple) or len(value) != 2:
                raise ValueError(f"operator 'between' needs exactly two values [low, high], got {value!r}")
            low, high = (coerce_value(name, kind, v) for v in value)
            if low > high:
                raise ValueError(f"operator 'between' needs low <= high, got [{low!r}, {high!r}]")
            return (low, high)
        if value is None:
            raise ValueError(f"operator {op!r} needs a value")
        if isinstance(value, list | tuple):
            raise ValueError(f"operator {op!r} takes one value, not a list")
        return coerce_value(name, kind, value)


class AttributeWithin(_Node):
    """A datetime attribute falls in the window next to `now`, both ends included:
    `next`: now <= value <= now + amount unit; `past`: now - amount unit <= value <= now."""

    type: Literal["attribute_within"] = "attribute_within"
    name: str
    direction: Literal["next", "past"]
    amount: int = Field(gt=0)
    unit: TimeUnit

    @field_validator("name")
    @classmethod
    def _datetime_attribute(cls, name: str) -> str:
        kind = attribute_type(name)
        if kind is not AttributeType.DATETIME:
            raise ValueError(f"attribute_within needs a datetime attribute; {name!r} is {kind.value}")
        return name

    @model_validator(mode="after")
    def _bounded(self) -> AttributeWithin:
        if self.delta > MAX_WINDOW:
            raise ValueError(f"a window may not exceed {MAX_WINDOW.days} days")
        return self

    @property
    def delta(self) -> dt.timedelta:
        return _delta(self.amount, self.unit)

    @property
    def minutes(self) -> int:
        return _minutes(self.amount, self.unit)


class Performed(_Node):
    """At least `min_count` events of `event_type` with now - within < time <= now."""

    type: Literal["performed"] = "performed"
    event_type: str = Field(min_length=1)
    min_count: int = Field(default=1, ge=1)
    within: Duration


class NotPerformed(_Node):
    """No event of `event_type` with now - within < time <= now (later events do not count)."""

    type: Literal["not_performed"] = "not_performed"
    event_type: str = Field(min_length=1)
    within: Duration


class PerformedWithout(_Node):
    """A `first` event not followed by a `then` event in time ("added to cart, not paid within 2 hours").

    True when some `first` event at time t has now - lookback < t <= now - within (its window has
    fully elapsed, so the answer cannot change later) and no `then` event has t <= time <= t + within
    (both ends included: a payment in the very millisecond of the cart event, or exactly `within`
    later, counts as paid). `lookback` must exceed `within`; `first` and `then` must differ.
    """

    type: Literal["performed_without"] = "performed_without"
    first: str = Field(min_length=1)
    then: str = Field(min_length=1)
    within: Duration
    lookback: Duration = Duration(amount=30, unit="days")

    @model_validator(mode="after")
    def _coherent(self) -> PerformedWithout:
        if self.first == self.then:
            raise ValueError(f"performed_without needs two different event types, got {self.first!r} twice")
        if self.lookback.delta <= self.within.delta:
            raise ValueError("performed_without needs a lookback longer than its within window")
        return self


class InPackage(_Node):
    """The user is a member of the package (an audience list kept outside the segment)."""

    type: Literal["in_package"] = "in_package"
    package_id: str = Field(min_length=1)


class AndNode(_Node):
    """Every child holds."""

    type: Literal["and"] = "and"
    nodes: list[Node] = Field(min_length=1)


class OrNode(_Node):
    """At least one child holds."""

    type: Literal["or"] = "or"
    nodes: list[Node] = Field(min_length=1)


class NotNode(_Node):
    """The child does not hold (plain negation of a result that is always true or false)."""

    type: Literal["not"] = "not"
    node: Node


Node = Annotated[
    HasTag
    | AttributeCondition
    | AttributeWithin
    | Performed
    | NotPerformed
    | PerformedWithout
    | InPackage
    | AndNode
    | OrNode
    | NotNode,
    Field(discriminator="type"),
]

AndNode.model_rebuild()
OrNode.model_rebuild()
NotNode.model_rebuild()

NODE_ADAPTER: TypeAdapter[Node] = TypeAdapter(Node)


def children(node: Node) -> list[Node]:
    match node:
        case AndNode(nodes=nodes) | OrNode(nodes=nodes):
            return list(nodes)
        case NotNode(node=child):
            return [child]
        case _:
            return []


def depth(node: Node) -> int:
    return 1 + max((depth(child) for child in children(node)), default=0)


class Segment(BaseModel):
    """A named audience: the users for whom `root` holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    root: Node
    description: str | None = None

    @model_validator(mode="after")
    def _shallow(self) -> Segment:
        if depth(self.root) > MAX_DEPTH:
            raise ValueError(f"a segment may nest at most {MAX_DEPTH} levels")
        return self


class UserFacts(BaseModel):
    """What the real-time evaluator knows about one user. Whitelisted attributes are checked and
    typed like segment values (None means missing); other keys pass through untouched. Event
    times are recent occurrences, in any order."""

    model_config = ConfigDict(extra="forbid")

    user_id: str
    attributes: dict[str, Any] = Field(default_factory=dict)
    tags: set[str] = Field(default_factory=set)
    events: dict[str, list[AwareDatetime]] = Field(default_factory=dict)

    @field_validator("attributes")
    @classmethod
    def _typed(cls, attributes: dict[str, Any]) -> dict[str, Any]:
        return {
            name: coerce_value(name, ATTRIBUTES[name], value) if name in ATTRIBUTES and value is not None else value
            for name, value in attributes.items()
        }

    @field_validator("events")
    @classmethod
    def _utc(cls, events: dict[str, list[dt.datetime]]) -> dict[str, list[dt.datetime]]:
        return {kind: [t.astimezone(dt.UTC) for t in times] for kind, times in events.items()}
