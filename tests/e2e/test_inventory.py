"""The peak phase on the real stack: stock changes tell the users who carted a product "only N left"
with the live number, once per threshold, and nothing once it sold out — not even what was queued."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from connectors import warehouse
from console.peak import cart_event, live_inventory, loop_idle, peak_documents, stock_event
from infra.waiting import wait_for
from schemas.config import Audience, Channel
from schemas.models import TERMINAL_CODES, OutcomeCode
from streams.policy import QuietHours
from tests.e2e.stack_io import fire_events, publish, received

pytestmark = pytest.mark.e2e

PRICE = 299.0


def stock(product: str, n: int, change: str):
    return stock_event(product, n, product_name=f"Earbuds {product}", price=PRICE, event_id=f"{product}-{change}")


def setup(settings, campaign_id: str, users: list[str], **campaign) -> None:
    channel = Channel(id=f"{campaign_id}-ch", provider="webhook", url=f"{settings.sandbox_base}/webhook/{campaign_id}")
    # Every inventory campaign hears every product's stock: each test's campaign is limited to its users.
    docs = peak_documents(
        channel.id, campaign_id=campaign_id, thresholds=[10, 5], audience=Audience(kind="users", user_ids=users),
        **campaign,
    )  # fmt: skip
    publish(settings, [channel, *docs], [{"user_id": u, "name": u.rsplit("-", 1)[-1]} for u in users])


def outcomes(wh, campaign_id: str) -> list[dict]:
    return wh.query(
        "SELECT message_id, user_id, code, reason FROM outcomes FINAL WHERE campaign_id = {c:String}",
        {"c": campaign_id},
    )


def count(wh, campaign_id: str, code: OutcomeCode) -> int:
    return len({r["message_id"] for r in outcomes(wh, campaign_id) if r["code"] == code})


def assert_one_verdict_each(rows: list[dict]) -> None:
    """Every message has exactly one terminal outcome; a repeat of it (a re-crossing, a replay)
    ends deduplicated, never with a second verdict."""
    verdicts: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r["code"] in TERMINAL_CODES:
            verdicts[r["message_id"]].add(r["code"])
    assert verdicts
    assert all(len(codes - {"deduplicated"}) == 1 for codes in verdicts.values()), verdicts


def test_carters_hear_the_live_number_once_per_threshold_and_nothing_after_sell_out(worker) -> None:
    settings, campaign, product = worker, "inv-peak", "inv-p1"
    carters, paid, never = ["inv-a", "inv-b", "inv-c"], "inv-paid", "inv-never"
    setup(settings, campaign, [*carters, paid, never])
    fire_events(
        settings,
        [stock(product, 30, "s0")]
        + [cart_event(u, product) for u in [*carters, paid]]
        + [cart_event(paid, product, "order_paid", amount=PRICE)],
    )
    wait_for(
        lambda: live_inventory(settings, product) == (set(carters), 30), timeout_s=60, what="carts and stock in Redis"
    )

    # Past 10, then one more sold in the same breath: the push quotes the stock when it is written.
    fire_events(settings, [stock(product, 8, "s1"), stock(product, 7, "s2")])
    wait_for(lambda: len(received(settings, campaign_id=campaign)) >= 3, timeout_s=60, what="3 pushes at 10")
    first = received(settings, campaign_id=campaign)
    assert sorted(b["user_id"] for b in first) == carters  # never the payer, never who never carted
    assert {b["title"] for b in first} == {f"{u.rsplit('-', 1)[-1]}, only 7 left" for u in carters}
    assert all(f"Earbuds {product}" in b["body"] and "only 7 left" in b["body"] for b in first)

    wh = warehouse.connect(settings)
    try:
        # A restock and a fall past 10 again: the same messages, ended deduplicated.
        fire_events(settings, [stock(product, 15, "s3"), stock(product, 9, "s4")])
        wait_for(lambda: count(wh, campaign, OutcomeCode.deduplicated) == 3, timeout_s=60, what="3 re-crossings")
        assert len(received(settings, campaign_id=campaign)) == 3

        # Past 5: the next threshold's push; its stock event replayed (a producer retry) changes nothing.
        fire_events(settings, [stock(product, 4, "s5")])
        wait_for(lambda: len(received(settings, campaign_id=campaign)) == 6, timeout_s=60, what="pushes at 5")
        fire_events(settings, [stock(product, 4, "s5")])
        wait_for(lambda: count(wh, campaign, OutcomeCode.deduplicated) == 6, timeout_s=60, what="the replay's 3")
        fifth = [b for b in received(settings, campaign_id=campaign) if b not in first]
        assert sorted(b["user_id"] for b in fifth) == carters and all("only 4 left" in b["title"] for b in fifth)

        # Sold out: no push, though the stock fell past every threshold.
        fire_events(settings, [stock(product, 0, "s6")])
        wait_for(lambda: live_inventory(settings, product)[1] == 0, timeout_s=60, what="the sell-out in Redis")
        wait_for(lambda: loop_idle(settings), timeout_s=90, interval_s=0.5, what="the loop to be idle")
        assert len(received(settings, campaign_id=campaign)) == 6
        rows = outcomes(wh, campaign)
        assert {r["user_id"] for r in rows} == set(carters)
        assert count(wh, campaign, OutcomeCode.sent) == 6
        assert_one_verdict_each(rows)
    finally:
        wh.close()


def test_a_push_queued_before_the_sell_out_is_suppressed_as_sold_out(worker) -> None:
    settings, campaign, product = worker, "inv-late", "inv-p2"
    carters = ["inv-late-x", "inv-late-y"]
    now = datetime.now(UTC)
    # Quiet hours (users' zone: UTC) for the next 40 s hold the pushes, queued in Redis, past the sell-out.
    quiet = QuietHours(start=(now - timedelta(minutes=1)).time(), end=(now + timedelta(seconds=40)).time())
    setup(settings, campaign, carters, quiet_hours=quiet)
    fire_events(settings, [stock(product, 30, "s0")] + [cart_event(u, product) for u in carters])
    wait_for(
        lambda: live_inventory(settings, product) == (set(carters), 30), timeout_s=60, what="carts and stock in Redis"
    )

    wh = warehouse.connect(settings)
    try:
        fire_events(settings, [stock(product, 4, "s1")])
        wait_for(lambda: count(wh, campaign, OutcomeCode.deferred) == 2, timeout_s=60, what="2 deferred pushes")
        fire_events(settings, [stock(product, 0, "s2")])
        wait_for(lambda: live_inventory(settings, product)[1] == 0, timeout_s=30, what="the sell-out in Redis")
        wait_for(lambda: count(wh, campaign, OutcomeCode.expired) == 2, timeout_s=90, what="2 sold-out outcomes")
        rows = outcomes(wh, campaign)
        assert {r["reason"] for r in rows if r["code"] == "expired"} == {f"sold out: {product}"}
        assert_one_verdict_each(rows)
    finally:
        wh.close()
    assert received(settings, campaign_id=campaign) == []
