from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.config import Audience, Campaign, Trigger
from schemas.models import Event, OutcomeCode, Priority
from streams.match import Touch, attribute_conversion, match_event, message_id

pytestmark = pytest.mark.unit

T = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def campaign(id: str = "c1", event: str = "cart_abandoned", **kw) -> Campaign:
    return Campaign(id=id, name=id, trigger=Trigger(event_type=event), channel="webhook", template_id="t", **kw)


def event(type_: str = "cart_abandoned", user: str = "u1", id: str = "e1", at: datetime = T) -> Event:
    return Event(event_id=id, event_type=type_, user_id=user, occurred_at=at, properties={"sku": "p1"})


# (campaigns, event, expected campaign ids)
CASES = [
    ([campaign()], event(), ["c1"]),
    ([campaign(event="order_paid")], event(), []),
    ([campaign("a"), campaign("b")], event(), ["a", "b"]),
    ([campaign(audience=Audience(kind="users", user_ids=["u2"]))], event(user="u1"), []),
    ([campaign(audience=Audience(kind="users", user_ids=["u1"]))], event(user="u1"), ["c1"]),
]


@pytest.mark.parametrize(("campaigns", "evt", "expected"), CASES)
def test_match(campaigns, evt, expected) -> None:
    assert [m.campaign_id for m in match_event(evt, campaigns)] == expected


def test_matched_message_carries_the_trigger() -> None:
    [m] = match_event(event(), [campaign(priority=Priority.high)])
    assert (m.user_id, m.event_id, m.priority, m.triggered_at, m.properties) == (
        "u1",
        "e1",
        Priority.high,
        T,
        {"sku": "p1"},
    )


def test_message_id_is_deterministic_and_distinct() -> None:
    assert message_id("c", "u", "e", "webhook") == message_id("c", "u", "e", "webhook")
    ids = {
        message_id(*parts)
        for parts in [
            ("c", "u", "e", "w"),
            ("c", "u", "e2", "w"),
            ("c2", "u", "e", "w"),
            ("c", "u", "e", "sms"),
            ("cu", "", "e", "w"),
        ]
    }
    assert len(ids) == 5


def touch(sent_at: datetime = T) -> Touch:
    return Touch(
        message_id="m1", campaign_id="c1", channel="webhook", triggered_at=T - timedelta(minutes=1), sent_at=sent_at
    )


# (event time relative to the send, window hours, converts?)
ATTRIBUTION = [
    (timedelta(minutes=5), 24, True),
    (timedelta(hours=25), 24, False),
    (-timedelta(minutes=5), 24, False),
]


@pytest.mark.parametrize(("delta", "window", "converts"), ATTRIBUTION)
def test_attribution_window(delta, window, converts) -> None:
    c = campaign(conversion_event="order_paid", attribution_window_hours=window)
    outcomes = attribute_conversion(event("order_paid", at=T + delta), [c], {"c1": touch()})
    assert [(o.message_id, o.code) for o in outcomes] == ([("m1", OutcomeCode.converted)] if converts else [])


def test_no_touch_no_conversion() -> None:
    c = campaign(conversion_event="order_paid")
    assert attribute_conversion(event("order_paid", at=T), [c], {}) == []


def _event(user: str, kind: str, n: int = 0, **properties) -> Event:
    return Event(event_id=f"{user}{kind}{n}", event_type=kind, user_id=user, occurred_at=T, properties=properties)


def test_a_trigger_never_sees_a_tag_its_user_earns_later_in_the_batch() -> None:
    from schemas.config import SegmentDocument, TagRule
    from streams.config_store import ConfigStore
    from streams.match import in_order

    store = ConfigStore()
    store.put(TagRule(id="r", event_type="coupon", add=["deal"]))
    store.put(SegmentDocument(id="s", name="s", root={"type": "has_tag", "tag": "deal"}))
    store.put(
        Campaign(
            id="c", name="c", trigger=Trigger(event_type="cart"), channel="x", template_id="t",
            audience=Audience(kind="segment", segment_id="s"),
        )
    )  # fmt: skip
    batch = [_event("a", "cart", 1), _event("b", "coupon"), _event("a", "coupon"), _event("a", "cart", 2)]
    pieces = in_order(batch, store)
    assert [[e.event_id for e in p] for p in pieces] == [["acart1", "bcoupon0"], ["acoupon0", "acart2"]]


def test_tag_rules_as_data_last_rule_wins() -> None:
    from schemas.config import TagRule
    from streams.tags import tag_effects

    rules = [
        TagRule(id="a", event_type="membership", add=["member"]),
        TagRule(id="b", event_type="membership", when={"price_type": "full"}, add=["full_price"], remove=["deal"]),
    ]
    assert tag_effects(_event("u", "membership", price_type="full"), rules) == {
        "member": (True, "a"), "full_price": (True, "b"), "deal": (False, "b"),
    }  # fmt: skip
    assert tag_effects(_event("u", "membership", price_type="discount"), rules) == {"member": (True, "a")}
    assert tag_effects(_event("u", "login"), rules) == {}
