"""The audience flywheel on the real stack: events arrive → tag rules change tags in real time →
the segment includes the user → the triggered campaign reaches them; profiles loaded as events
land in Redis and ClickHouse alike, so ClickHouse counts the same segment."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import pytest

from connectors import warehouse
from connectors.kafka import produce
from connectors.segment_sql import to_sql
from infra import topics
from infra.waiting import wait_for
from schemas.config import Audience, Campaign, Channel, SegmentDocument, TagRule, Template, Trigger
from schemas.models import PROFILE_UPDATED, Event

pytestmark = pytest.mark.e2e


def send(settings, *events: Event) -> None:
    asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in events]))


def event(user: str, kind: str, n: int, **properties) -> Event:
    return Event(
        event_id=f"{user}-{kind}-{n}", event_type=kind, user_id=user, occurred_at=datetime.now(UTC),
        properties=properties,
    )  # fmt: skip


def arrived(settings) -> list[dict]:
    items = httpx.get(f"{settings.sandbox_base}/_sandbox/webhook/requests", params={"limit": 100000}).json()["items"]
    return [i["body"] for i in items if i["body"]["campaign_id"] == "au-deals"]


def test_tags_learnt_from_events_bring_users_into_a_segment_and_its_campaign(worker) -> None:
    settings = worker
    segment = SegmentDocument(
        id="au-deal-hunters",
        name="price-sensitive shoppers in Hangzhou",
        root={
            "type": "and",
            "nodes": [
                {"type": "has_tag", "tag": "au_price_sensitive"},
                {"type": "attribute", "name": "city", "op": "=", "value": "Hangzhou"},
                {"type": "performed", "event_type": "au_cart_add", "within": {"amount": 1, "unit": "days"}},
            ],
        },
    )
    documents = [
        TagRule(id="au-coupon", event_type="au_coupon_claimed", add=["au_price_sensitive"]),
        TagRule(
            id="au-full-price", event_type="au_membership_purchased", when={"price_type": "full"},
            add=["au_full_price"], remove=["au_price_sensitive"],
        ),
        segment,
        Channel(id="au-hook", provider="webhook", url=f"{settings.sandbox_base}/webhook/au"),
        Template(id="au-t", body="${name}, your cart items are on sale"),
        Campaign(
            id="au-deals", name="deals", trigger=Trigger(event_type="au_cart_add"), channel="au-hook",
            template_id="au-t", audience=Audience(kind="segment", segment_id="au-deal-hunters"), daily_cap=100,
        ),
    ]  # fmt: skip
    asyncio.run(produce(settings.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in documents]))
    send(
        settings,
        event("au-ann", PROFILE_UPDATED, 0, name="Ann", city="Hangzhou", age=31),
        event("au-bo", PROFILE_UPDATED, 0, name="Bo", city="Beijing", age=40),
    )
    wh = warehouse.connect(settings)
    try:
        wait_for(
            lambda: len(wh.query("SELECT user_id FROM user_attributes FINAL WHERE user_id LIKE 'au-%'")) == 2,
            timeout_s=60, what="both profiles in ClickHouse",
        )  # fmt: skip
        # Not yet price-sensitive: a cart add reaches nobody.
        send(settings, event("au-ann", "au_cart_add", 1), event("au-bo", "au_cart_add", 1))
        send(settings, event("au-ann", "au_coupon_claimed", 1), event("au-bo", "au_coupon_claimed", 1))

        def tag_history() -> list[tuple[str, str, str]]:
            rows = wh.query("SELECT user_id, tag, change FROM user_tag_changes WHERE user_id LIKE 'au-%'")
            return [(r["user_id"], r["tag"], r["change"]) for r in rows]

        def cart_adds() -> int:
            sql = "SELECT count() AS n FROM user_events WHERE user_id = 'au-ann' AND event_type = 'au_cart_add'"
            return wh.query(sql)[0]["n"]

        wait_for(lambda: len(tag_history()) == 2, timeout_s=60, what="two tag changes")
        # Now Ann is in the segment (tag + city + a cart add today); Bo is not (Beijing).
        send(settings, event("au-ann", "au_cart_add", 2), event("au-bo", "au_cart_add", 2))
        [message] = wait_for(lambda: arrived(settings), timeout_s=60, what="the campaign's message to Ann")
        assert message["user_id"] == "au-ann" and message["body"] == "Ann, your cart items are on sale"
        # ClickHouse counts the same segment over the same users (tags kept current by the feedback stage).
        wait_for(
            lambda: cart_adds() == 2,
            timeout_s=60, what="Ann's cart adds in ClickHouse",
        )  # fmt: skip
        counted = wh.query(to_sql(segment.segment, "clickhouse", datetime.now(UTC)))
        assert [r["user_id"] for r in counted] == ["au-ann"]
        # A full-price membership removes the tag: Ann leaves the segment and hears nothing more.
        send(settings, event("au-ann", "au_membership_purchased", 1, price_type="full"))
        wait_for(lambda: len(tag_history()) == 4, timeout_s=60, what="the full-price tag changes")
        send(settings, event("au-ann", "au_cart_add", 3))
        wait_for(
            lambda: cart_adds() == 3,
            timeout_s=60, what="the third cart add processed",
        )  # fmt: skip
        assert sorted(tag_history()) == sorted(
            [
                ("au-ann", "au_price_sensitive", "added"),
                ("au-bo", "au_price_sensitive", "added"),
                ("au-ann", "au_full_price", "added"),
                ("au-ann", "au_price_sensitive", "removed"),
            ]
        )
        tags = wh.query("SELECT user_id, tag FROM user_tags FINAL WHERE user_id LIKE 'au-%' ORDER BY user_id, tag")
        assert [(r["user_id"], r["tag"]) for r in tags] == [
            ("au-ann", "au_full_price"),
            ("au-bo", "au_price_sensitive"),
        ]
    finally:
        wh.close()
    assert len(arrived(settings)) == 1
