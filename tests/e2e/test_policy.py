"""Delivery policy on the real stack: quiet hours defer and release, stale messages expire, SMS
keywords and one-click links unsubscribe, and a replayed trigger is never sent twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from connectors import warehouse
from infra.waiting import wait_for
from schemas.config import Campaign, Channel, Template, Trigger
from streams.policy import QuietHours
from tests.e2e.stack_io import fire, publish, received

pytestmark = pytest.mark.e2e


def setup(settings, documents, users: list[str]) -> None:
    publish(settings, documents, [{"user_id": u, "name": u[-2:]} for u in users])


def arrived(settings, campaign_id: str) -> list[dict]:
    return received(settings, campaign_id=campaign_id)


def codes(wh, campaign_id: str) -> Counter:
    rows = wh.query("SELECT code, reason FROM outcomes FINAL WHERE campaign_id = {c:String}", {"c": campaign_id})
    assert all(r["reason"] for r in rows if r["code"] not in ("sent", "delivered", "clicked", "converted"))
    return Counter(r["code"] for r in rows)


def documents(settings, prefix: str, *, fmt: str = "webhook", **campaign) -> list:
    return [
        Channel(id=f"{prefix}-ch", provider="webhook", url=f"{settings.sandbox_base}/webhook/{prefix}", format=fmt),
        Template(id=f"{prefix}-t", title="Hello", body="${name}, news for you"),
        Campaign(
            id=prefix,
            name=prefix,
            trigger=Trigger(event_type=f"{prefix}_go"),
            channel=f"{prefix}-ch",
            template_id=f"{prefix}-t",
            **campaign,
        ),
    ]


def test_quiet_hours_defer_release_and_expire(worker) -> None:
    settings = worker
    now = datetime.now(UTC)
    # Quiet hours that began a minute ago and end in a few seconds (users' time zone: UTC by default).
    soon = QuietHours(start=(now - timedelta(minutes=1)).time(), end=(now + timedelta(seconds=5)).time())
    later = QuietHours(start=(now - timedelta(minutes=1)).time(), end=(now + timedelta(minutes=3)).time())
    users = [f"qh-user-{i}" for i in range(5)]
    setup(settings, documents(settings, "qh", quiet_hours=soon), users)
    setup(settings, documents(settings, "qhstale", quiet_hours=later, max_age_minutes=1), users)
    fire(settings, "qh_go", users)
    fire(settings, "qhstale_go", users)

    wh = warehouse.connect(settings)
    try:
        wait_for(lambda: codes(wh, "qh")["deferred"] == 5, timeout_s=60, what="5 deferred outcomes")
        assert arrived(settings, "qh") == []  # nothing went out during quiet hours
        wait_for(lambda: len(arrived(settings, "qh")) == 5, timeout_s=60, what="the 5 released messages")
        wait_for(lambda: codes(wh, "qh")["sent"] == 5, timeout_s=30, what="5 sent outcomes")
        # Stale before the window ends: expired with its reason, never sent.
        wait_for(lambda: codes(wh, "qhstale")["expired"] == 5, timeout_s=30, what="5 expired outcomes")
        assert arrived(settings, "qhstale") == []
    finally:
        wh.close()


def test_unsubscribe_by_sms_keyword_and_email_link(worker) -> None:
    settings = worker
    setup(settings, documents(settings, "unsub", fmt="email"), ["unsub-sms", "unsub-mail", "unsub-stays"])
    url = f"{settings.http_base}/inbound/sms"
    assert httpx.post(url, json={"user_id": "unsub-sms", "text": "stop by later"}).json() == {"unsubscribed": False}
    assert httpx.post(url, json={"user_id": "unsub-sms", "text": " 退订 "}).json() == {"unsubscribed": True}

    fire(settings, "unsub_go", ["unsub-mail"], "-1")
    [mail] = wait_for(lambda: arrived(settings, "unsub"), timeout_s=60, what="the first email")
    one_click = mail["extra"]["headers"]["List-Unsubscribe"].strip("<>")
    assert mail["extra"]["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert httpx.post(one_click).status_code == 200

    fire(settings, "unsub_go", ["unsub-sms", "unsub-mail", "unsub-stays"], "-2")
    wh = warehouse.connect(settings)
    try:
        wait_for(
            lambda: codes(wh, "unsub")["opted_out"] == 2 and codes(wh, "unsub")["sent"] == 2,
            timeout_s=60,
            what="two opt-outs and the one user who stayed",
        )
    finally:
        wh.close()
    assert sorted(b["user_id"] for b in arrived(settings, "unsub")) == ["unsub-mail", "unsub-stays"]


def test_a_replayed_trigger_is_never_sent_twice(worker) -> None:
    settings = worker
    setup(settings, documents(settings, "replay"), ["replay-user"])
    fire(settings, "replay_go", ["replay-user"])
    wait_for(lambda: arrived(settings, "replay"), timeout_s=60, what="the first send")
    fire(settings, "replay_go", ["replay-user"])  # the same event again: same message id
    wh = warehouse.connect(settings)
    try:
        wait_for(lambda: codes(wh, "replay")["deduplicated"] == 1, timeout_s=60, what="the duplicate's outcome")
    finally:
        wh.close()
    assert len(arrived(settings, "replay")) == 1


def test_provider_rate_is_respected(worker) -> None:
    settings = worker
    rate, users = 30.0, [f"rate-user-{i:03d}" for i in range(330)]
    docs = documents(settings, "rate")
    docs[0] = docs[0].model_copy(update={"rate_per_s": rate})
    setup(settings, docs, users)
    fire(settings, "rate_go", users)
    # 30 at once (the bucket's burst), then 30/s: about ten seconds of sending.
    wait_for(lambda: len(arrived(settings, "rate")) == len(users), timeout_s=60, what="all 330 at the provider")
    items = httpx.get(f"{settings.sandbox_base}/_sandbox/webhook/requests", params={"limit": 100000}).json()["items"]
    times = sorted(i["received_at"] for i in items if i["body"]["campaign_id"] == "rate")
    steady = times[int(rate) :]  # after the initial burst
    measured = (len(steady) - 1) / (steady[-1] - steady[0])
    assert abs(measured - rate) / rate <= 0.10, measured


def test_urgent_traffic_pauses_the_backlog_without_losing_any_of_it(worker) -> None:
    """Urgent messages pause the lower tiers' partitions mid-fetch; every backlog message still
    arrives exactly once (a pause used to skip the rest of the batch being fetched)."""
    from connectors.kafka import produce
    from infra import topics
    from schemas.models import Priority, RenderedMessage

    settings = worker
    docs = documents(settings, "burst", priority=Priority.high, category="service", daily_cap=1000)
    setup(settings, docs, [f"burst-u{i}" for i in range(60)])
    now = datetime.now(UTC)
    backlog = [
        (f"bl{i}", RenderedMessage(message_id=f"bl-{i}", campaign_id="backlog", user_id=f"bl{i}", channel="burst-ch",
                                   priority=Priority.low, triggered_at=now, address="x", body="marketing"))
        for i in range(3000)
    ]  # fmt: skip
    asyncio.run(produce(settings.bootstrap, topics.DISPATCH_LOW.name, backlog))
    for wave in range(6):  # urgent triggers while the backlog drains: each one pauses the lower tiers
        fire(settings, "burst_go", [f"burst-u{i}" for i in range(wave * 10, wave * 10 + 10)])
    wait_for(lambda: len(arrived(settings, "burst")) == 60, timeout_s=60, what="the 60 urgent messages")
    wait_for(lambda: len(arrived(settings, "backlog")) >= 3000, timeout_s=120, what="the whole backlog")
    ids = [b["message_id"] for b in arrived(settings, "backlog")]
    assert len(ids) == len(set(ids)) == 3000
