"""The e-commerce scenario's peak phase as data: the "only N left" campaign and its template, and
builders for the cart and stock events that drive it (the demo and the e2e tests publish these)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

from connectors.kafka import group_lag
from connectors.state import State
from infra import topics
from infra.settings import Settings
from schemas.config import Campaign, Document, InventoryTrigger, Template, Trigger
from schemas.models import Event
from streams.inventory import STOCK_CHANGED
from streams.policy import QuietHours

PEAK = "peak-scarcity"
THRESHOLDS = (20, 10, 5, 3, 1)


def peak_documents(
    channel_id: str, *, campaign_id: str = PEAK, thresholds: Sequence[int] = THRESHOLDS, **campaign
) -> list[Document]:
    """The template and the campaign, for an existing channel; `campaign` overrides its fields
    (quiet_hours, daily_cap, priority, audience …). Quiet hours are off: a sale runs at any hour."""
    template = Template(
        id=f"{campaign_id}-t",
        title='${name!"Hi"}, only ${stock} left',
        body="${product_name} is still in your cart: only ${stock} left at ¥${price}.",
        link=f"https://shop.example/p/${{product_id}}?utm_campaign={campaign_id}",
        cta="Check out",
    )
    fields = {
        "name": "Peak: only N left, from live inventory",
        "quiet_hours": QuietHours(enabled=False),
        "conversion_event": "order_paid",
        "attribution_window_hours": 24,
        **campaign,
    }
    return [
        template,
        Campaign(
            id=campaign_id,
            trigger=Trigger(event_type=STOCK_CHANGED, inventory=InventoryTrigger(thresholds=list(thresholds))),
            channel=channel_id,
            template_id=template.id,
            **fields,
        ),
    ]


def cart_event(
    user_id: str, product_id: str, kind: str = "cart_add", *, event_id: str | None = None, **properties
) -> Event:
    """cart_add, cart_remove or order_paid of one product (order_paid takes it out of the cart)."""
    return Event(
        event_id=event_id or f"{kind}-{user_id}-{product_id}",
        event_type=kind,
        user_id=user_id,
        occurred_at=datetime.now(UTC),
        properties={"product_id": product_id, **properties},
    )


def stock_event(
    product_id: str, stock: int, *, product_name: str, price: float, event_id: str, at: datetime | None = None
) -> Event:
    """One change of a product's stock. Its user is the product, so all of a product's changes are
    on one partition, in order; `event_id` names this change (a replay repeats it)."""
    return Event(
        event_id=event_id,
        event_type=STOCK_CHANGED,
        user_id=product_id,
        occurred_at=at or datetime.now(UTC),
        properties={"product_id": product_id, "stock": stock, "product_name": product_name, "price": price},
    )


def live_inventory(settings: Settings, product_id: str) -> tuple[set[str], int | None]:
    """The product's carters and live stock as Redis holds them (what the next push is written from)."""

    async def read() -> tuple[set[str], int | None]:
        state = State(settings.redis)
        try:
            carters = {u async for chunk in state.inventory.carters(product_id) for u in chunk}
            return carters, (await state.inventory.stocks([product_id]))[product_id]
        finally:
            await state.close()

    return asyncio.run(read())


def loop_idle(settings: Settings) -> bool:
    """Everything produced so far has been handled and committed, up to dispatch: nothing more can go out."""
    stage_topics = [topics.EVENTS.name, topics.MATCHED.name, topics.RENDERED.name]
    stage_topics += [t.name for t in topics.DISPATCH.values()]
    return asyncio.run(group_lag(settings.bootstrap, settings.app_id, stage_topics)) == 0
