"""The whole loop on the real stack: events in Kafka → worker → sandbox → receipts, clicks and
conversions → ClickHouse; malformed events end in the DLQ with reasons."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime

import httpx
import pytest

from connectors import warehouse
from connectors.kafka import produce, produce_raw, read_to_end
from connectors.state import State
from infra import topics
from infra.waiting import wait_for
from schemas.config import Campaign, Channel, Template, Trigger
from schemas.contracts import codec
from schemas.models import TERMINAL_CODES, DeadLetter, Event

pytestmark = pytest.mark.e2e

CAMPAIGN = "e2e-cart"
USERS = [f"e2e-u{i:02d}" for i in range(20)]
NONAME = "e2e-noname"
MALFORMED = [b"{definitely not json", b'{"event_type": "e2e_cart"}', b"\xc3\x01\x00\x00\x00\x00\x00\x00\x00\x00zz"]


def documents(settings) -> list:
    return [
        Channel(id="e2e-hook", provider="webhook", url=f"{settings.sandbox_base}/webhook/e2e"),
        Template(
            id="e2e-t",
            title="{{ name }}",
            body="{{ name }}, {{ sku }} is waiting",
            link="https://shop.example/{{ sku }}",
        ),
        Campaign(
            id=CAMPAIGN,
            name="e2e",
            trigger=Trigger(event_type="e2e_cart"),
            channel="e2e-hook",
            template_id="e2e-t",
            daily_cap=2,
            conversion_event="e2e_paid",
        ),
    ]


def cart(user: str, n: int = 0) -> Event:
    return Event(
        event_id=f"{user}-cart-{n}",
        event_type="e2e_cart",
        user_id=user,
        occurred_at=datetime.now(UTC),
        properties={"sku": "p-1"},
    )


def sandbox_items(settings) -> list[dict]:
    items = httpx.get(f"{settings.sandbox_base}/_sandbox/webhook/requests", params={"limit": 100000}).json()["items"]
    return [i for i in items if i["body"]["campaign_id"] == CAMPAIGN]


def outcome_rows(wh) -> list[dict]:
    return wh.query(
        "SELECT message_id, code, reason FROM outcomes FINAL WHERE campaign_id = {c:String}", {"c": CAMPAIGN}
    )


@pytest.fixture(scope="module")
def e2e_campaign(worker):
    """The channel, template and campaign these tests use, published once."""
    asyncio.run(produce(worker.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in documents(worker)]))
    return worker


def test_events_to_funnel(e2e_campaign) -> None:
    settings = e2e_campaign
    httpx.post(f"{settings.sandbox_base}/_sandbox/webhook/faults", json={"receipt_delay_ms": 50}).raise_for_status()

    async def setup() -> None:
        state = State(settings.redis)
        await state.put_profiles([{"user_id": u, "name": f"N{u[-2:]}"} for u in USERS] + [{"user_id": NONAME}])
        await state.close()
        # 20 users once; USERS[0] twice more (the daily cap of 2 stops the third); one user with no name.
        events = [cart(u) for u in USERS] + [cart(USERS[0], 1), cart(USERS[0], 2), cart(NONAME)]
        await produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in events])
        await produce_raw(settings.bootstrap, topics.EVENTS.name, [(b"bad", m) for m in MALFORMED])

    asyncio.run(setup())
    wh = warehouse.connect(settings)
    try:

        def settled() -> list[dict]:
            rows = outcome_rows(wh)
            terminal = [r for r in rows if r["code"] in TERMINAL_CODES]
            delivered = [r for r in rows if r["code"] == "delivered"]
            return rows if len(terminal) >= 23 and len(delivered) >= 21 else []

        rows = wait_for(settled, timeout_s=120, interval_s=0.3, what="23 terminal outcomes and 21 receipts")

        # Exactly the expected messages reached the sandbox, each once.
        arrived = sandbox_items(settings)
        assert len(arrived) == 21
        assert len({i["body"]["message_id"] for i in arrived}) == 21
        assert Counter(i["body"]["user_id"] for i in arrived)[USERS[0]] == 2

        # One terminal outcome per message, with the expected mix.
        terminal = [r for r in rows if r["code"] in TERMINAL_CODES]
        assert Counter(r["message_id"] for r in terminal).most_common(1)[0][1] == 1
        assert Counter(r["code"] for r in terminal) == {"sent": 21, "capped": 1, "render_failed": 1}
        assert any("name" in (r["reason"] or "") for r in terminal if r["code"] == "render_failed")

        # The malformed events are in the DLQ with reasons, and mirrored into ClickHouse.
        letters = [
            codec(DeadLetter).decode(r.value) for r in asyncio.run(read_to_end(settings.bootstrap, topics.DLQ.name))
        ]
        ours = [letter for letter in letters if letter.original in MALFORMED]
        assert sorted(letter.original for letter in ours) == sorted(MALFORMED)
        assert all(letter.stage == "match" and letter.reason for letter in ours)
        wait_for(
            lambda: len(wh.query("SELECT offset FROM dead_letters FINAL WHERE key = 'bad'")) == 3,
            timeout_s=30,
            what="dead letters in ClickHouse",
        )

        # A click through the tracked link, then a purchase: clicked and converted outcomes.
        # A user with one message, so the purchase is credited to the message that was clicked
        # (conversions go to the user's last message of the campaign).
        clicked = next(i["body"] for i in arrived if i["body"]["user_id"] != USERS[0])
        response = httpx.get(clicked["link"], follow_redirects=False)
        assert response.status_code == 302 and response.headers["location"] == "https://shop.example/p-1"
        assert httpx.get(clicked["link"][:-3] + "xyz", follow_redirects=False).status_code == 404
        paid = Event(
            event_id="e2e-order-1", event_type="e2e_paid", user_id=clicked["user_id"], occurred_at=datetime.now(UTC)
        )
        asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(paid.user_id, paid)]))

        def engaged() -> bool:
            codes = {(r["message_id"], r["code"]) for r in outcome_rows(wh)}
            return {(clicked["message_id"], "clicked"), (clicked["message_id"], "converted")} <= codes

        wait_for(engaged, timeout_s=60, interval_s=0.3, what="clicked and converted outcomes")
    finally:
        wh.close()

    # The funnel as an operator reads it, through the CLI.
    out = subprocess.run(
        [sys.executable, "-m", "console", "report", "funnel", "--campaign", CAMPAIGN, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    [row] = json.loads(out)
    assert (row["targeted"], row["sent"], row["delivered"], row["clicked"], row["converted"]) == (23, 21, 21, 1, 1)


def test_http_ingest(e2e_campaign) -> None:
    """Events posted over HTTP take the same path; an invalid batch is refused whole, with reasons."""
    settings = e2e_campaign
    url = f"{settings.http_base}/v1/events"
    refused = httpx.post(
        url,
        json=[
            {"event_id": "ok", "event_type": "e2e_cart", "user_id": "x", "occurred_at": "2026-11-24T00:00:00Z"},
            {"event_type": "e2e_cart"},
        ],
    )
    assert refused.status_code == 400
    assert [e["index"] for e in refused.json()["errors"]] == [1]
    assert httpx.post(url, content=b"{nope").status_code == 400

    asyncio.run(_put_profile(settings, "e2e-http-user"))
    body = {
        "event_id": "http-1",
        "event_type": "e2e_cart",
        "user_id": "e2e-http-user",
        "occurred_at": datetime.now(UTC).isoformat(),
        "properties": {"sku": "p-9"},
    }
    accepted = httpx.post(url, json=body)
    assert accepted.status_code == 202 and accepted.json() == {"accepted": 1}
    wait_for(
        lambda: any(i["body"]["user_id"] == "e2e-http-user" for i in sandbox_items(settings)),
        timeout_s=60,
        what="the ingested event's message at the sandbox",
    )
    [item] = [i for i in sandbox_items(settings) if i["body"]["user_id"] == "e2e-http-user"]
    assert item["body"]["body"] == "Nhttp-user, p-9 is waiting"


async def _put_profile(settings, user_id: str) -> None:
    state = State(settings.redis)
    await state.put_profiles([{"user_id": user_id, "name": f"N{user_id[4:]}"}])
    await state.close()


def test_sms_short_link_redirects_and_counts_the_click(e2e_campaign) -> None:
    settings = e2e_campaign
    documents = [
        Channel(
            id="e2e-sms", provider="webhook", url=f"{settings.sandbox_base}/webhook/e2e-sms", format="sms", brand="Shop"
        ),
        Campaign(
            id="e2e-sms-cart",
            name="sms",
            trigger=Trigger(event_type="e2e_sms_cart"),
            channel="e2e-sms",
            template_id="e2e-t",
        ),
    ]
    asyncio.run(produce(settings.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in documents]))
    asyncio.run(_put_profile(settings, "e2e-sms-user"))
    event = Event(
        event_id="sms-1",
        event_type="e2e_sms_cart",
        user_id="e2e-sms-user",
        occurred_at=datetime.now(UTC),
        properties={"sku": "p-7"},
    )
    asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(event.user_id, event)]))

    def message() -> dict | None:
        items = httpx.get(f"{settings.sandbox_base}/_sandbox/webhook/requests", params={"limit": 100000}).json()
        return next((i["body"] for i in items["items"] if i["body"]["campaign_id"] == "e2e-sms-cart"), None)

    body = wait_for(message, timeout_s=60, what="the SMS at the sandbox")
    short = body["link"]
    assert "/s/" in short and len(short.rsplit("/", 1)[1]) == 10 and short in body["body"]
    assert body["body"].startswith("Shop: ") and body["extra"]["encoding"] == "GSM-7"
    response = httpx.get(short, follow_redirects=False)
    assert response.status_code == 302 and response.headers["location"] == "https://shop.example/p-7"
    assert httpx.get(short[:-1] + ("x" if short[-1] != "x" else "y"), follow_redirects=False).status_code == 404
    wh = warehouse.connect(settings)
    try:
        wait_for(
            lambda: wh.query("SELECT 1 FROM outcomes WHERE campaign_id = 'e2e-sms-cart' AND code = 'clicked'"),
            timeout_s=30,
            what="the click outcome",
        )
    finally:
        wh.close()
