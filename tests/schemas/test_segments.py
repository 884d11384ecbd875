"""The segment language's validation: good trees load and survive a JSON round trip; bad ones are
refused with a message that names the problem."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.segments import (
    ATTRIBUTES,
    NODE_ADAPTER,
    AttributeCondition,
    AttributeType,
    Duration,
    PerformedWithout,
    Segment,
    UserFacts,
)

pytestmark = pytest.mark.unit

WITHIN_2H = {"amount": 2, "unit": "hours"}

GOOD_TREE: dict[str, Any] = {
    "type": "or",
    "nodes": [
        {"type": "has_tag", "tag": "o'brien"},
        {"type": "attribute", "name": "age", "op": "between", "value": [18, 30]},
        {"type": "attribute", "name": "city", "op": "in", "value": ["Paris", "Berlin"]},
        {"type": "attribute", "name": "lifetime_value", "op": ">=", "value": 10},
        {"type": "attribute", "name": "signup_at", "op": "<", "value": "2025-01-01T00:00:00+02:00"},
        {"type": "attribute", "name": "vip_level", "op": "exists"},
        {"type": "attribute_within", "name": "membership_expires_at", "direction": "next", "amount": 3, "unit": "days"},
        {"type": "performed", "event_type": "login", "min_count": 2, "within": {"amount": 7, "unit": "days"}},
        {"type": "not_performed", "event_type": "purchase", "within": {"amount": 30, "unit": "days"}},
        {"type": "performed_without", "first": "cart_add", "then": "payment", "within": WITHIN_2H},
        {"type": "in_package", "package_id": "pkg-1"},
        {"type": "not", "node": {"type": "and", "nodes": [{"type": "has_tag", "tag": "vip"}]}},
    ],
}


def _node(data: dict[str, Any]) -> Any:
    return NODE_ADAPTER.validate_python(data)


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        _node(data)
    return str(caught.value)


def test_whitelist_has_the_documented_attributes() -> None:
    assert ATTRIBUTES["age"] is AttributeType.INT
    assert ATTRIBUTES["lifetime_value"] is AttributeType.FLOAT
    assert ATTRIBUTES["membership_expires_at"] is AttributeType.DATETIME
    assert ATTRIBUTES["city"] is AttributeType.STR
    assert "user_id" not in ATTRIBUTES


def test_good_tree_loads_and_round_trips_through_json() -> None:
    segment = Segment(id="s1", name="Everything", root=GOOD_TREE, description=None)
    again = Segment.model_validate_json(segment.model_dump_json())
    assert again == segment
    assert again.model_dump(mode="json") == segment.model_dump(mode="json")
    age = segment.root.nodes[1]
    assert isinstance(age, AttributeCondition) and age.value == (18, 30)


def test_values_take_the_attribute_type() -> None:
    value = _node({"type": "attribute", "name": "lifetime_value", "op": "=", "value": 10}).value
    assert value == 10.0 and isinstance(value, float)
    signup = _node({"type": "attribute", "name": "signup_at", "op": "<", "value": "2025-01-01T00:00:00+02:00"})
    assert signup.value == dt.datetime(2024, 12, 31, 22, tzinfo=dt.UTC)
    assert signup.value.utcoffset() == dt.timedelta(0)


def test_defaults() -> None:
    performed = _node({"type": "performed", "event_type": "login", "within": WITHIN_2H})
    assert performed.min_count == 1
    without = _node({"type": "performed_without", "first": "a", "then": "b", "within": WITHIN_2H})
    assert isinstance(without, PerformedWithout) and without.lookback.delta == dt.timedelta(days=30)
    assert Duration(amount=90, unit="minutes").delta == dt.timedelta(minutes=90)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "attribute", "name": "user_id", "op": "=", "value": "x"}, "unknown attribute 'user_id'"),
        ({"type": "attribute", "name": "age; DROP TABLE x", "op": "exists"}, "unknown attribute"),
        ({"type": "attribute", "name": "age", "op": "=", "value": "30"}, "attribute 'age' is of type int"),
        ({"type": "attribute", "name": "age", "op": "=", "value": 30.5}, "attribute 'age' is of type int"),
        ({"type": "attribute", "name": "age", "op": "=", "value": True}, "attribute 'age' is of type int"),
        ({"type": "attribute", "name": "age", "op": "=", "value": 2**63}, "out of range"),
        ({"type": "attribute", "name": "city", "op": "=", "value": 3}, "attribute 'city' is of type str"),
        ({"type": "attribute", "name": "lifetime_value", "op": ">", "value": "nan"}, "of type float"),
        ({"type": "attribute", "name": "lifetime_value", "op": ">", "value": float("inf")}, "finite"),
        ({"type": "attribute", "name": "signup_at", "op": "<", "value": "2025-01-01T00:00:00"}, "of type datetime"),
        ({"type": "attribute", "name": "age", "op": "between", "value": [1]}, "exactly two values"),
        ({"type": "attribute", "name": "age", "op": "between", "value": [1, 2, 3]}, "exactly two values"),
        ({"type": "attribute", "name": "age", "op": "between", "value": [5, 1]}, "low <= high"),
        ({"type": "attribute", "name": "age", "op": "in", "value": []}, "non-empty list"),
        ({"type": "attribute", "name": "age", "op": "in", "value": 3}, "non-empty list"),
        ({"type": "attribute", "name": "age", "op": "=", "value": [3]}, "takes one value"),
        ({"type": "attribute", "name": "age", "op": ">"}, "needs a value"),
        ({"type": "attribute", "name": "age", "op": "exists", "value": 3}, "takes no value"),
        ({"type": "attribute", "name": "city", "op": "<", "value": "Paris"}, "needs an int, float or datetime"),
        ({"type": "attribute", "name": "age", "op": "like", "value": "3"}, "Input should be '='"),
        ({"type": "attribute_within", "name": "age", "direction": "next", "amount": 3, "unit": "days"}, "datetime"),
        (
            {"type": "attribute_within", "name": "signup_at", "direction": "soon", "amount": 3, "unit": "days"},
            "'next' or 'past'",
        ),
        (
            {"type": "attribute_within", "name": "signup_at", "direction": "past", "amount": 0, "unit": "days"},
            "greater than 0",
        ),
        ({"type": "performed", "event_type": "x", "within": {"amount": 1, "unit": "weeks"}}, "'minutes', 'hours'"),
        ({"type": "performed", "event_type": "x", "min_count": 0, "within": WITHIN_2H}, "greater than or equal to 1"),
        ({"type": "performed", "event_type": "x", "within": {"amount": 4000, "unit": "days"}}, "may not exceed"),
        ({"type": "performed", "event_type": "", "within": WITHIN_2H}, "at least 1 character"),
        ({"type": "not_performed", "event_type": "x"}, "within"),
        ({"type": "performed_without", "first": "a", "then": "a", "within": WITHIN_2H}, "two different event types"),
        (
            {
                "type": "performed_without",
                "first": "a",
                "then": "b",
                "within": WITHIN_2H,
                "lookback": {"amount": 120, "unit": "minutes"},
            },
            "lookback longer",
        ),
        ({"type": "has_tag", "tag": "vip", "extra": 1}, "Extra inputs are not permitted"),
        ({"type": "has_tag"}, "Field required"),
        ({"type": "and", "nodes": []}, "at least 1 item"),
        ({"type": "not", "node": {"type": "nope"}}, "does not match any of the expected tags"),
        ({"type": "xor", "nodes": []}, "does not match any of the expected tags"),
    ],
)
def test_bad_nodes_are_refused_clearly(data: dict[str, Any], message: str) -> None:
    assert message in _error(data)


def test_errors_inside_a_tree_point_at_the_node() -> None:
    tree = {"type": "and", "nodes": [{"type": "has_tag", "tag": "a"}, {"type": "attribute", "name": "shoe_size"}]}
    with pytest.raises(ValidationError) as caught:
        Segment(id="s", name="s", root=tree)
    assert "root.and.nodes.1.attribute.name" in str(caught.value)
    assert "unknown attribute 'shoe_size'" in str(caught.value)


def test_segment_fields() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        Segment(id="s", name="s", root={"type": "has_tag", "tag": "a"}, owner="me")
    with pytest.raises(ValidationError, match="at least 1 character"):
        Segment(id="", name="s", root={"type": "has_tag", "tag": "a"})
    deep: dict[str, Any] = {"type": "has_tag", "tag": "a"}
    for _ in range(40):
        deep = {"type": "not", "node": deep}
    with pytest.raises(ValidationError, match="nest at most"):
        Segment(id="s", name="s", root=deep)


def test_user_facts_type_their_attributes_and_keep_times_in_utc() -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    facts = UserFacts(
        user_id="u1",
        attributes={"age": 30, "lifetime_value": 5, "signup_at": dt.datetime(2025, 1, 1, 1, tzinfo=paris), "x": [1]},
        events={"login": [dt.datetime(2025, 1, 1, 1, tzinfo=paris)]},
    )
    assert facts.attributes["lifetime_value"] == 5.0
    assert facts.attributes["signup_at"] == dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    assert facts.attributes["x"] == [1]
    assert facts.events["login"][0].tzinfo is dt.UTC
    with pytest.raises(ValidationError, match="of type int"):
        UserFacts(user_id="u1", attributes={"age": "thirty"})
    with pytest.raises(ValidationError, match="timezone"):
        UserFacts(user_id="u1", events={"login": [dt.datetime(2025, 1, 1)]})
