"""The real-time segment evaluator: every node, window edges to the millisecond, time zones,
missing attributes under NOT, and the event history a caller must keep."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from schemas.segments import NODE_ADAPTER, UserFacts
from streams.segments import evaluate, max_window, referenced_events

pytestmark = pytest.mark.unit

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
MS = dt.timedelta(milliseconds=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


def no_packages(package_id: str, user_id: str) -> bool:
    return False


def holds(node: dict[str, Any], now: dt.datetime = NOW, packages: Any = no_packages, **facts: Any) -> bool:
    return evaluate(NODE_ADAPTER.validate_python(node), UserFacts(user_id="u1", **facts), now, packages)


def attr(name: str, op: str, value: Any = None) -> dict[str, Any]:
    node = {"type": "attribute", "name": name, "op": op}
    return node if op == "exists" else node | {"value": value}


def within(amount: int, unit: str) -> dict[str, Any]:
    return {"amount": amount, "unit": unit}


LOGIN_1D = {"type": "performed", "event_type": "login", "within": within(1, "days")}
NO_LOGIN_1D = {"type": "not_performed", "event_type": "login", "within": within(1, "days")}
CART_UNPAID = {"type": "performed_without", "first": "cart", "then": "pay", "within": within(2, "hours")}


def test_has_tag() -> None:
    assert holds({"type": "has_tag", "tag": "o'brien"}, tags={"o'brien"})
    assert not holds({"type": "has_tag", "tag": "VIP"}, tags={"vip"})


@pytest.mark.parametrize(
    ("op", "value", "expected"),
    [
        ("=", 30, True),
        ("!=", 30, False),
        ("<", 30, False),
        ("<=", 30, True),
        (">", 29, True),
        (">=", 31, False),
        ("in", [1, 30], True),
        ("in", [1, 2], False),
        ("between", [30, 40], True),
        ("between", [20, 30], True),
        ("between", [31, 40], False),
        ("exists", None, True),
    ],
)
def test_attribute_operators(op: str, value: Any, expected: bool) -> None:
    assert holds(attr("age", op, value), attributes={"age": 30}) is expected


@pytest.mark.parametrize(
    "node",
    [
        attr("age", "=", 30),
        attr("age", "!=", 30),
        attr("age", "<", 30),
        attr("age", ">=", 30),
        attr("age", "in", [30]),
        attr("age", "between", [0, 100]),
        attr("age", "exists"),
        {"type": "attribute_within", "name": "signup_at", "direction": "past", "amount": 3, "unit": "days"},
    ],
)
def test_a_missing_attribute_makes_every_leaf_false_and_its_negation_true(node: dict[str, Any]) -> None:
    for attributes in ({}, {"age": None, "signup_at": None}):
        assert not holds(node, attributes=attributes)
        assert holds({"type": "not", "node": node}, attributes=attributes)


def test_not_over_a_present_attribute_is_plain_negation() -> None:
    assert not holds({"type": "not", "node": attr("city", "!=", "Paris")}, attributes={"city": "Berlin"})
    assert holds({"type": "not", "node": attr("city", "!=", "Paris")}, attributes={"city": "Paris"})


def test_float_and_string_attributes() -> None:
    assert holds(attr("lifetime_value", "between", [10, 10.5]), attributes={"lifetime_value": 10.5})
    assert holds(attr("city", "in", ["back\\slash", "x"]), attributes={"city": "back\\slash"})


def test_datetime_attribute_compares_instants_across_zones() -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    signup = dt.datetime(2025, 1, 1, 9, 0, tzinfo=tokyo)  # 2025-01-01 00:00 UTC
    assert holds(attr("signup_at", "=", "2025-01-01T00:00:00Z"), attributes={"signup_at": signup})
    assert holds(attr("signup_at", "<", "2025-01-01T01:00:00+01:00"), attributes={"signup_at": signup - MS})
    assert not holds(attr("signup_at", "<", "2025-01-01T01:00:00+01:00"), attributes={"signup_at": signup})
    assert holds(attr("signup_at", "<=", "2024-12-31T19:00:00-05:00"), attributes={"signup_at": signup})


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(-MS, False), (dt.timedelta(0), True), (3 * DAY, True), (3 * DAY + MS, False)],
)
def test_attribute_within_next_includes_both_ends(offset: dt.timedelta, expected: bool) -> None:
    node = {
        "type": "attribute_within",
        "name": "membership_expires_at",
        "direction": "next",
        "amount": 3,
        "unit": "days",
    }
    assert holds(node, attributes={"membership_expires_at": NOW + offset}) is expected


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (MS, False),
        (dt.timedelta(0), True),
        (-90 * dt.timedelta(minutes=1), True),
        (-90 * dt.timedelta(minutes=1) - MS, False),
    ],
)
def test_attribute_within_past_includes_both_ends(offset: dt.timedelta, expected: bool) -> None:
    node = {"type": "attribute_within", "name": "last_login_at", "direction": "past", "amount": 90, "unit": "minutes"}
    assert holds(node, attributes={"last_login_at": NOW + offset}) is expected


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(-DAY, False), (-DAY + MS, True), (dt.timedelta(0), True), (MS, False)],
)
def test_performed_window_excludes_its_start_and_includes_now(offset: dt.timedelta, expected: bool) -> None:
    assert holds(LOGIN_1D, events={"login": [NOW + offset]}) is expected
    assert holds(NO_LOGIN_1D, events={"login": [NOW + offset]}) is not expected


def test_performed_min_count() -> None:
    node = {"type": "performed", "event_type": "login", "min_count": 3, "within": within(1, "hours")}
    times = [NOW, NOW - 30 * dt.timedelta(minutes=1), NOW - HOUR + MS]
    assert holds(node, events={"login": times})
    assert not holds(node, events={"login": [*times[:2], NOW - HOUR, NOW + MS]})
    assert not holds(node, events={"page_view": times})


def test_not_performed_without_any_history() -> None:
    assert holds(NO_LOGIN_1D)
    assert not holds(LOGIN_1D)


@pytest.mark.parametrize(
    ("cart", "pay", "expected"),
    [
        ([NOW - 2 * HOUR], [], True),  # its window ends exactly now: elapsed
        ([NOW - 2 * HOUR + MS], [], False),  # still open
        ([NOW - 3 * HOUR], [NOW - HOUR], False),  # paid exactly at the deadline
        ([NOW - 3 * HOUR], [NOW - HOUR + MS], True),  # paid a millisecond late
        ([NOW - 3 * HOUR], [NOW - 3 * HOUR], False),  # paid in the same instant
        ([NOW - 3 * HOUR], [NOW - 3 * HOUR - MS], True),  # paid before the cart: another purchase
        ([NOW - 30 * DAY], [], False),  # the lookback excludes its start
        ([NOW - 30 * DAY + MS], [], True),
        ([NOW - 10 * HOUR, NOW - 4 * HOUR], [NOW - 9 * HOUR], True),  # the second cart is unpaid
        ([NOW - 10 * HOUR, NOW - 4 * HOUR], [NOW - 9 * HOUR, NOW - 3 * HOUR], False),
        ([], [], False),
    ],
)
def test_performed_without_edges(cart: list[dt.datetime], pay: list[dt.datetime], expected: bool) -> None:
    assert holds(CART_UNPAID, events={"cart": cart, "pay": pay}) is expected


def test_performed_without_measures_elapsed_time_across_a_dst_change() -> None:
    # Paris moved its clocks forward at 2025-03-30 01:00 UTC: wall-clock arithmetic would make the
    # 2-hour window only 1 hour long.
    paris = ZoneInfo("Europe/Paris")
    cart = dt.datetime(2025, 3, 30, 1, 30, tzinfo=paris)  # 00:30 UTC
    paid = cart + dt.timedelta(hours=1, minutes=45)  # wall clock 03:15 CEST = 01:15 UTC: 45 minutes later
    now = dt.datetime(2025, 3, 30, 12, tzinfo=paris)
    assert paid.astimezone(dt.UTC) - cart.astimezone(dt.UTC) == dt.timedelta(minutes=45)
    assert not holds(CART_UNPAID, now=now, events={"cart": [cart], "pay": [paid]})
    assert holds(CART_UNPAID, now=now, events={"cart": [cart], "pay": [cart.astimezone(dt.UTC) + 2 * HOUR + MS]})


def test_now_and_events_in_other_zones_compare_as_instants() -> None:
    sao_paulo = ZoneInfo("America/Sao_Paulo")
    now_local = NOW.astimezone(sao_paulo)
    edge = (NOW - DAY).astimezone(ZoneInfo("Asia/Kolkata"))
    assert not holds(LOGIN_1D, now=now_local, events={"login": [edge]})
    assert holds(LOGIN_1D, now=now_local, events={"login": [edge + MS]})
    with pytest.raises(ValueError, match="timezone-aware"):
        holds(LOGIN_1D, now=NOW.replace(tzinfo=None))


def test_in_package_asks_the_lookup() -> None:
    asked: list[tuple[str, str]] = []

    def lookup(package_id: str, user_id: str) -> bool:
        asked.append((package_id, user_id))
        return package_id == "pkg-a"

    assert holds({"type": "in_package", "package_id": "pkg-a"}, packages=lookup)
    assert not holds({"type": "in_package", "package_id": "pkg-b"}, packages=lookup)
    assert asked == [("pkg-a", "u1"), ("pkg-b", "u1")]


def test_and_or_not() -> None:
    vip = {"type": "has_tag", "tag": "vip"}
    old = attr("age", ">", 60)
    facts = {"tags": {"vip"}, "attributes": {"age": 30}}
    assert holds({"type": "and", "nodes": [vip]}, **facts)
    assert not holds({"type": "and", "nodes": [vip, old]}, **facts)
    assert holds({"type": "or", "nodes": [old, vip]}, **facts)
    assert not holds({"type": "or", "nodes": [old]}, **facts)
    assert holds({"type": "not", "node": {"type": "and", "nodes": [vip, old]}}, **facts)
    assert holds({"type": "not", "node": {"type": "not", "node": vip}}, **facts)


def test_referenced_events_and_max_window() -> None:
    tree = NODE_ADAPTER.validate_python(
        {
            "type": "or",
            "nodes": [
                LOGIN_1D,
                {"type": "not", "node": {"type": "not_performed", "event_type": "buy", "within": within(36, "hours")}},
                {
                    "type": "and",
                    "nodes": [CART_UNPAID | {"lookback": within(7, "days")}, {"type": "has_tag", "tag": "x"}],
                },
            ],
        }
    )
    assert referenced_events(tree) == {"login", "buy", "cart", "pay"}
    assert max_window(tree) == 7 * DAY
    tag_only = NODE_ADAPTER.validate_python({"type": "has_tag", "tag": "x"})
    assert referenced_events(tag_only) == set()
    assert max_window(tag_only) == dt.timedelta(0)
    assert max_window(NODE_ADAPTER.validate_python(CART_UNPAID)) == 30 * DAY
