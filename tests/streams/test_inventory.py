"""The peak phase's pure parts: threshold crossings, cart and stock changes, the fan-out's ids."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.config import Campaign, Channel, InventoryTrigger, Template, Trigger
from schemas.models import Event, MatchedMessage, Priority
from streams.inventory import (
    STOCK_CHANGED,
    CartChange,
    StockChange,
    crossed,
    inventory_change,
    sold_out,
    sold_out_reason,
)
from streams.match import match_event, threshold_messages
from streams.render import RenderSettings, inventory_product, render_message, with_live_stock

pytestmark = pytest.mark.unit

T = datetime(2026, 11, 11, 0, 0, tzinfo=UTC)
THRESHOLDS = [20, 10, 5, 3, 1]

# (previous stock, new stock, expected threshold to announce)
CROSSINGS = [
    (30, 25, None),  # above every threshold
    (25, 20, 20),  # reaching a threshold is crossing it
    (20, 19, None),  # already past 20, not yet at 10
    (25, 4, 5),  # one big drop past 20, 10 and 5: only the lowest
    (6, 5, 5),
    (5, 4, None),
    (2, 1, 1),
    (1, 0, None),  # sold out: nobody hears "only 0 left"
    (25, 0, None),
    (4, 12, None),  # a restock crosses nothing
    (12, 9, 10),  # falling again after a restock: the same threshold again (dedup ends the repeat)
    (None, 30, None),  # first report, above every threshold
    (None, 4, 5),  # first report already low: counts as coming from above
    (5, 5, None),  # a replayed change
]


@pytest.mark.parametrize(("previous", "current", "expected"), CROSSINGS)
def test_crossed(previous, current, expected) -> None:
    assert crossed(previous, current, THRESHOLDS) == expected


def test_thresholds_in_any_order() -> None:
    assert crossed(25, 4, [1, 5, 3, 20, 10]) == 5


def test_sold_out() -> None:
    assert sold_out(0) and not sold_out(1) and not sold_out(None)
    assert sold_out_reason("p-1") == "sold out: p-1"


def event(event_type: str, user: str = "u1", **properties) -> Event:
    return Event(
        event_id=f"{user}-{event_type}", event_type=event_type, user_id=user, occurred_at=T, properties=properties
    )


# (event, expected change)
CHANGES = [
    (event("cart_add", product_id="p-1"), CartChange("p-1", "u1", True)),
    (event("cart_remove", product_id="p-1"), CartChange("p-1", "u1", False)),
    (event("order_paid", product_id="p-1"), CartChange("p-1", "u1", False)),
    (event("order_paid", amount=9.5), None),  # an order without a product id changes no cart
    (event("cart_abandoned", product_id="p-1"), None),
    (event(STOCK_CHANGED, "p-1", product_id="p-1", stock=7), StockChange("p-1", 7, f"p-1-{STOCK_CHANGED}")),
    (event(STOCK_CHANGED, "p-1", product_id="p-1", stock=7.0), StockChange("p-1", 7, f"p-1-{STOCK_CHANGED}")),
]


@pytest.mark.parametrize(("evt", "expected"), CHANGES)
def test_inventory_change(evt, expected) -> None:
    assert inventory_change(evt) == expected


@pytest.mark.parametrize("properties", [{"stock": 3}, {"product_id": "p", "stock": -1}, {"product_id": "p"},
                                        {"product_id": "p", "stock": "3"}, {"product_id": "p", "stock": 2.5},
                                        {"product_id": "p", "stock": True}])  # fmt: skip
def test_a_bad_stock_event_is_refused_with_the_reason(properties) -> None:
    with pytest.raises(ValueError, match=STOCK_CHANGED):
        inventory_change(event(STOCK_CHANGED, "p", **properties))


def peak_campaign(**kw) -> Campaign:
    trigger = Trigger(event_type=STOCK_CHANGED, inventory=InventoryTrigger(thresholds=THRESHOLDS))
    return Campaign(id="peak", name="peak", trigger=trigger, channel="push", template_id="t", **kw)


def test_inventory_trigger_is_declared_on_stock_events_only() -> None:
    with pytest.raises(ValidationError, match="stock_changed"):
        Trigger(event_type="cart_add", inventory=InventoryTrigger(thresholds=[5]))
    for bad in ([], [0], [5, 5]):
        with pytest.raises(ValidationError):
            InventoryTrigger(thresholds=bad)


def stock_event(stock: int, event_id: str = "s1") -> Event:
    return Event(
        event_id=event_id,
        event_type=STOCK_CHANGED,
        user_id="p-1",
        occurred_at=T,
        properties={"product_id": "p-1", "stock": stock, "product_name": "Earbuds", "price": 299.0},
    )


def test_an_inventory_campaign_never_messages_the_stock_events_user() -> None:
    assert match_event(stock_event(4), [peak_campaign()]) == []


def test_one_message_per_carter_with_an_id_per_product_and_threshold() -> None:
    campaign = peak_campaign(priority=Priority.high)
    first = threshold_messages(campaign, stock_event(4, "s1"), "p-1", 5, ["u1", "u2"])
    # Another stock event crossing the same threshold (after a restock, or a replay): the same ids.
    again = threshold_messages(campaign, stock_event(5, "s9"), "p-1", 5, ["u1", "u2"])
    other = threshold_messages(campaign, stock_event(3, "s2"), "p-1", 3, ["u1", "u2"])
    assert [m.user_id for m in first] == ["u1", "u2"]
    assert [m.message_id for m in first] == [m.message_id for m in again]
    assert not {m.message_id for m in first} & {m.message_id for m in other}
    assert len({m.message_id for m in first}) == 2
    assert first[0].priority is Priority.high and first[0].properties["threshold"] == 5
    assert first[0].properties["product_name"] == "Earbuds"


def test_the_campaigns_audience_still_applies() -> None:
    campaign = peak_campaign(audience={"kind": "users", "user_ids": ["u2"]})
    assert [m.user_id for m in threshold_messages(campaign, stock_event(4), "p-1", 5, ["u1", "u2"])] == ["u2"]


def test_render_quotes_the_live_stock_and_names_the_product() -> None:
    campaign = peak_campaign()
    [message] = threshold_messages(campaign, stock_event(5), "p-1", 5, ["u1"])
    template = Template(id="t", title="${name}, only ${stock} left", body="${product_name} at ¥${price}")
    channel = Channel(id="push", provider="webhook")
    settings = RenderSettings("http://links.test", "secret")
    live = with_live_stock(message, 2)
    rendered = render_message(live, {"name": "Lin"}, campaign, template, channel, settings)
    assert rendered.title == "Lin, only 2 left" and rendered.inventory_product == "p-1"
    # No stock recorded: the trigger's number stays.
    assert with_live_stock(message, None) is message


def test_messages_of_other_campaigns_quote_no_product() -> None:
    other = Campaign(id="c", name="c", trigger=Trigger(event_type="cart_add"), channel="push", template_id="t")
    message = MatchedMessage(
        message_id="m", campaign_id="c", user_id="u1", event_id="e", event_type="cart_add", channel="push",
        priority=Priority.normal, triggered_at=T, properties={"product_id": "p-1"},
    )  # fmt: skip
    assert inventory_product(message, other) is None
    assert inventory_product(message, None) is None
