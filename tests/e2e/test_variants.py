"""A/B variants on the real stack: both variants reach the provider and the report shows both;
users outside a test's share wait, and are released with the fallback when the deadline passes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from connectors import warehouse
from connectors.kafka import produce
from connectors.state import State
from infra import topics
from infra.waiting import wait_for
from schemas.config import Campaign, CampaignVariant, Channel, Template, Trigger
from schemas.models import TERMINAL_CODES, Event
from streams.copy.variants import Experiment

pytestmark = pytest.mark.e2e


def publish(settings, documents) -> None:
    asyncio.run(produce(settings.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in documents]))


def trigger(settings, event_type: str, users: list[str]) -> None:
    async def go() -> None:
        state = State(settings.redis)
        await state.put_profiles([{"user_id": u, "name": u[-3:]} for u in users])
        await state.close()
        now = datetime.now(UTC)
        events = [Event(event_id=f"{u}-{event_type}", event_type=event_type, user_id=u, occurred_at=now) for u in users]
        await produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in events])

    asyncio.run(go())


def arrived(settings, campaign_id: str) -> list[dict]:
    items = httpx.get(f"{settings.sandbox_base}/_sandbox/webhook/requests", params={"limit": 100000}).json()["items"]
    return [i["body"] for i in items if i["body"]["campaign_id"] == campaign_id]


def copies(settings, prefix: str) -> list:
    return [
        Channel(id=f"{prefix}-hook", provider="webhook", url=f"{settings.sandbox_base}/webhook/{prefix}"),
        Template(id=f"{prefix}-a", title="A", body="${name}, only a few left", link="https://shop.example/a"),
        Template(
            id=f"{prefix}-b",
            title="B",
            body="<#if name??>${name}, </#if>your discount is extended 24h",
            link="https://shop.example/b",
        ),
    ]


def variants(prefix: str) -> list[CampaignVariant]:
    return [CampaignVariant(id="a", template_id=f"{prefix}-a"), CampaignVariant(id="b", template_id=f"{prefix}-b")]


def test_bandit_sends_both_variants_and_the_report_shows_them(worker) -> None:
    settings = worker
    campaign = Campaign(
        id="ab-bandit",
        name="bandit",
        trigger=Trigger(event_type="ab_bandit"),
        channel="abb-hook",
        variants=variants("abb"),
        experiment=Experiment(mode="bandit", fallback="a"),
    )
    publish(settings, [*copies(settings, "abb"), campaign])
    users = [f"abb-user-{i:03d}" for i in range(60)]
    trigger(settings, "ab_bandit", users)
    bodies = wait_for(
        lambda: (b := arrived(settings, "ab-bandit")) and len(b) >= 60 and b,
        timeout_s=90,
        what="60 bandit messages at the sandbox",
    )
    by_variant = Counter(b["variant"] for b in bodies)
    assert set(by_variant) == {"a", "b"} and min(by_variant.values()) >= 10
    assert all(b["title"] == b["variant"].upper() for b in bodies)

    def reported() -> dict | None:
        out = subprocess.run(
            [sys.executable, "-m", "console", "report", "funnel", "--campaign", "ab-bandit", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        rows = json.loads(out)
        return (
            rows[0] if rows and sum(int(v["sent"]) for v in rows[0]["variants"]) == 60 and rows[0]["decision"] else None
        )

    # A click carries no variant of its own; the report still credits it to the message's variant.
    clicked = next(b for b in bodies if b["variant"] == "b")
    assert httpx.get(clicked["link"], follow_redirects=False).status_code == 302

    def reported_with_click() -> dict | None:
        row = reported()
        return row if row and {v["variant"]: int(v["clicked"]) for v in row["variants"]} == {"a": 0, "b": 1} else None

    row = wait_for(reported_with_click, timeout_s=60, interval_s=1, what="both variants, the click and a decision")
    assert {v["variant"]: int(v["sent"]) for v in row["variants"]} == dict(by_variant)
    assert row["decision"]["status"] == "continue" and set(json.loads(row["decision"]["probabilities"])) == {"a", "b"}


def test_waiting_users_get_the_fallback_at_the_deadline(worker) -> None:
    settings = worker
    campaign = Campaign(
        id="ab-wait",
        name="wait",
        trigger=Trigger(event_type="ab_wait"),
        channel="abw-hook",
        variants=variants("abw"),
        experiment=Experiment(test_share=0.2, fallback="b"),
        decide_by=datetime.now(UTC) + timedelta(seconds=4),
    )
    publish(settings, [*copies(settings, "abw"), campaign])
    users = [f"abw-user-{i:03d}" for i in range(100)]
    trigger(settings, "ab_wait", users)

    # Everyone ends up sent: the test share right away, the rest once the deadline forces the fallback.
    bodies = wait_for(
        lambda: (b := arrived(settings, "ab-wait")) and len(b) >= 100 and b,
        timeout_s=90,
        what="all 100 messages, held ones included",
    )
    variant_of = {b["user_id"]: b["variant"] for b in bodies}
    assert len(bodies) == 100 and len(variant_of) == 100
    counts = Counter(variant_of.values())
    assert counts["a"] >= 3 and counts["b"] >= 60  # the held ~80% all got the fallback "b"

    wh = warehouse.connect(settings)
    try:
        decisions = wh.query("SELECT status, winner, reason FROM ab_decisions WHERE campaign_id = 'ab-wait'")
        # The sandbox can be ahead of ClickHouse by a feedback batch: wait for all 100 outcomes.
        terminal = wait_for(
            lambda: (
                (
                    rows := wh.query(
                        "SELECT message_id, count() AS n FROM outcomes FINAL WHERE campaign_id = 'ab-wait' "
                        "AND has({terminal:Array(String)}, code) GROUP BY message_id",
                        {"terminal": sorted(TERMINAL_CODES)},
                    )
                )
                and len(rows) >= 100
                and rows
            ),
            timeout_s=30,
            what="a terminal outcome for each of the 100 messages",
        )
    finally:
        wh.close()
    assert {"status": "fallback", "winner": "b"} in [{k: d[k] for k in ("status", "winner")} for d in decisions]
    assert len(terminal) == 100 and all(r["n"] == 1 for r in terminal)
