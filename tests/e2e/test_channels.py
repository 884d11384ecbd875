"""Channels on the real stack: receipts from providers become outcomes, retryable failures are
tried again without blocking, an outage moves traffic to the backup provider, and a failed push
falls back to exactly one SMS — every attempt visible in ClickHouse."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime

import httpx
import pytest

from connectors import warehouse
from connectors.channels.sandboxes.fcm import h2_port
from connectors.channels.sandboxes.http2 import certificate_path
from connectors.kafka import produce
from infra import topics
from infra.waiting import wait_for
from schemas.config import Campaign, Channel, ProviderRoute, Template, Trigger
from schemas.models import Event
from tests.e2e.stack_io import fire, publish, received

pytestmark = pytest.mark.e2e


def faults(settings, scheme: str, **values) -> None:
    httpx.post(f"{settings.sandbox_base}/_sandbox/{scheme}/faults", json=values).raise_for_status()


def attempts(wh, campaign_id: str) -> list[dict]:
    return wh.query(
        "SELECT message_id, user_id, attempt, code, provider, fallback_of, channel FROM delivery_attempts"
        " WHERE campaign_id = {c:String} ORDER BY message_id, attempt, occurred_at",
        {"c": campaign_id},
    )


def outcomes(wh, campaign_id: str) -> list[dict]:
    return wh.query(
        "SELECT message_id, user_id, channel, code, provider, fallback_of FROM outcomes FINAL"
        " WHERE campaign_id = {c:String}",
        {"c": campaign_id},
    )


def sms_campaign(settings, prefix: str, routes: list[ProviderRoute]) -> list:
    return [
        Channel(id=f"{prefix}-sms", provider=routes[0].provider, providers=routes, format="sms", address_field="phone"),
        Template(id=f"{prefix}-t", body="${name}, your order ships today"),
        Campaign(
            id=prefix, name=prefix, trigger=Trigger(event_type=f"{prefix}_go"), channel=f"{prefix}-sms",
            template_id=f"{prefix}-t", daily_cap=1000,
        ),
    ]  # fmt: skip


def test_outage_moves_traffic_to_the_backup_and_receipts_come_back(worker) -> None:
    settings = worker
    twilio = ProviderRoute(provider="twilio", url=f"{settings.sandbox_base}/twilio", options={"from": "+15550000"})
    backup = ProviderRoute(provider="http-sms", url=f"{settings.sandbox_base}/http-sms", weight=0)
    users = [f"fo-{i}" for i in range(20)]
    publish(
        settings,
        sms_campaign(settings, "fo", [twilio, backup]),
        [{"user_id": u, "name": u, "phone": f"+1555010{i:04d}"} for i, u in enumerate(users)],
    )
    wh = warehouse.connect(settings)
    faults(settings, "twilio", outage=True)
    try:
        fire(settings, "fo_go", users)
        rows = wait_for(
            lambda: [r for r in outcomes(wh, "fo") if r["code"] == "delivered"] if len(
                [r for r in outcomes(wh, "fo") if r["code"] == "delivered"]) == 20 else None,
            timeout_s=60, what="20 delivered receipts from the backup",
        )  # fmt: skip
        assert {r["provider"] for r in rows} == {"http-sms"}
        sent = [r for r in outcomes(wh, "fo") if r["code"] == "sent"]
        assert len(sent) == 20 and {r["provider"] for r in sent} == {"http-sms"}
        # Each message reached the backup exactly once; every failed try at the primary is on record.
        ids = {r["message_id"] for r in sent}
        assert Counter(b["ref"] for b in received(settings, "http-sms") if b.get("ref") in ids) == dict.fromkeys(ids, 1)
        tries = attempts(wh, "fo")
        assert {(t["code"], t["provider"]) for t in tries} <= {("retrying", "twilio"), ("sent", "http-sms")}
        assert any(t["code"] == "retrying" for t in tries)
        # The primary recovers: after the breaker's pause one probe finds it well and traffic returns.
        faults(settings, "twilio", outage=False)
        late = [f"fo-late-{i}" for i in range(5)]
        publish(settings, profiles=[{"user_id": u, "name": u, "phone": f"+1555020{i:04d}"} for i, u in enumerate(late)])

        def back_on_twilio() -> bool:
            fire(settings, "fo_go", late, suffix=f"-{datetime.now(UTC).timestamp()}")
            return any(r["code"] == "sent" and r["provider"] == "twilio" for r in outcomes(wh, "fo"))

        wait_for(back_on_twilio, timeout_s=60, interval_s=1, what="traffic back on the recovered primary")
    finally:
        faults(settings, "twilio", outage=False)
        wh.close()


def test_a_retryable_failure_is_tried_again_later_and_succeeds(worker) -> None:
    settings = worker
    route = ProviderRoute(provider="http-sms", url=f"{settings.sandbox_base}/http-sms")
    users = [f"rt-{i}" for i in range(3)]
    publish(
        settings,
        sms_campaign(settings, "rt", [route]),
        [{"user_id": u, "name": u, "phone": f"+1555030{i:04d}"} for i, u in enumerate(users)],
    )
    wh = warehouse.connect(settings)
    faults(settings, "http-sms", outage=True)
    try:
        fire(settings, "rt_go", users)
        wait_for(
            lambda: len({t["message_id"] for t in attempts(wh, "rt") if t["code"] == "retrying"}) == 3,
            timeout_s=60, what="a first failed attempt for each message",
        )  # fmt: skip
        faults(settings, "http-sms", outage=False)
        wait_for(
            lambda: sum(t["code"] == "sent" for t in attempts(wh, "rt")) == 3, timeout_s=90, what="3 sends on retry"
        )
        tries = attempts(wh, "rt")
        for message_id in {t["message_id"] for t in tries}:
            mine = [t for t in tries if t["message_id"] == message_id]
            assert [t["code"] for t in mine][-1] == "sent" and all(t["code"] == "retrying" for t in mine[:-1])
            assert mine[-1]["attempt"] > 1
        # Sent once each: the outage refused the earlier attempts before anything was recorded.
        refs = Counter(b.get("ref") for b in received(settings, "http-sms"))
        assert all(refs[t["message_id"]] == 1 for t in tries)
        assert not [r for r in outcomes(wh, "rt") if r["code"] == "failed"]
    finally:
        faults(settings, "http-sms", outage=False)
        wh.close()


def test_a_failed_push_falls_back_to_exactly_one_sms(worker) -> None:
    settings = worker
    base = settings.sandbox_base
    # FCM over HTTP/2 + TLS, as fcm.googleapis.com serves it: the sandbox's HTTP/2 port and its certificate.
    fcm_url, ca_file = f"https://{settings.host}:{h2_port(settings)}", str(certificate_path(settings.home))
    documents = [
        Channel(
            id="fb-push", provider="fcm", url=fcm_url, format="push-fcm", address_field="fcm_token",
            options={"ca_file": ca_file},
        ),
        Channel(id="fb-sms", provider="http-sms", url=f"{base}/http-sms", format="sms", address_field="phone"),
        Template(id="fb-t", title="Your cart", body="${name}, only 2 left"),
        Campaign(
            id="fb", name="fb", trigger=Trigger(event_type="fb_go"), channel="fb-push", fallback_channels=["fb-sms"],
            template_id="fb-t", daily_cap=1000,
        ),
    ]  # fmt: skip
    profiles = [
        {"user_id": "fb-dead", "name": "Ann", "fcm_token": "unregistered-token-1", "phone": "+15550400001"},
        {"user_id": "fb-live", "name": "Bo", "fcm_token": "token-live-1", "phone": "+15550400002"},
        {"user_id": "fb-none", "name": "Cy", "phone": "+15550400003"},
    ]
    publish(settings, documents, profiles)
    wh = warehouse.connect(settings)
    try:
        fire(settings, "fb_go", [p["user_id"] for p in profiles])
        fire(settings, "fb_go", [p["user_id"] for p in profiles])  # a replayed trigger: still one SMS each

        def sms_to() -> Counter:
            return Counter(b.get("to") for b in received(settings, "http-sms"))

        wait_for(lambda: sms_to()["+15550400001"] >= 1 and sms_to()["+15550400003"] >= 1, timeout_s=60, what="2 SMS")
        wait_for(
            lambda: any(r["user_id"] == "fb-live" and r["code"] == "sent" for r in outcomes(wh, "fb")),
            timeout_s=30, what="the push to the live device",
        )  # fmt: skip
        rows = outcomes(wh, "fb")
        wait_for(
            lambda: sum(r["code"] == "sent" and r["channel"] == "fb-sms" for r in outcomes(wh, "fb")) == 2,
            timeout_s=30, what="2 SMS sent outcomes",
        )  # fmt: skip
        rows = outcomes(wh, "fb")
        counts = sms_to()
        assert counts["+15550400001"] == 1 and counts["+15550400003"] == 1 and counts["+15550400002"] == 0
        by_user = {(r["user_id"], r["channel"], r["code"]) for r in rows}
        assert ("fb-dead", "fb-push", "failed") in by_user and ("fb-dead", "fb-sms", "sent") in by_user
        assert ("fb-none", "fb-push", "no_address") in by_user and ("fb-none", "fb-sms", "sent") in by_user
        assert ("fb-live", "fb-push", "sent") in by_user and ("fb-live", "fb-sms", "sent") not in by_user
        assert {b["http_version"] for b in received(settings, "fcm") if b["token"] == "token-live-1"} == {"2"}
        push_ids = {r["user_id"]: r["message_id"] for r in rows if r["channel"] == "fb-push"}
        for r in rows:
            if r["channel"] == "fb-sms":
                assert r["fallback_of"] == push_ids[r["user_id"]]
    finally:
        wh.close()


def test_the_inbox_lists_counts_and_marks_read(worker) -> None:
    settings = worker
    documents = [
        Channel(id="ib-inbox", provider="inbox", format="inbox"),
        Template(id="ib-t", title="Order shipped", body="${name}, parcel {order} is on its way"),
        Campaign(
            id="ib", name="ib", trigger=Trigger(event_type="ib_go"), channel="ib-inbox", template_id="ib-t",
            daily_cap=1000, category="service",
        ),
    ]  # fmt: skip
    publish(settings, documents, [{"user_id": "ib-user", "name": "Dee"}])
    now = datetime.now(UTC)
    events = [
        Event(event_id=f"ib-{i}", event_type="ib_go", user_id="ib-user", occurred_at=now, properties={"order": f"A{i}"})
        for i in range(3)
    ]
    asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in events]))
    inbox = f"{settings.http_base}/v1/users/ib-user/inbox"
    page = wait_for(
        lambda: (r := httpx.get(inbox).json())["unread"] == 3 and r, timeout_s=60, what="3 unread inbox messages"
    )
    assert {i["body"] for i in page["items"]} == {f"Dee, parcel A{i} is on its way" for i in range(3)}
    first = page["items"][0]["message_id"]
    marked = httpx.post(f"{inbox}/read", json={"message_ids": [first]}).json()
    assert marked == {"marked_read": 1, "unread": 2}
    assert httpx.get(f"{inbox}?limit=2").json()["next_before"] is not None
    assert httpx.post(f"{inbox}/read").json()["unread"] == 0
    assert httpx.get(f"{inbox}/unread").json() == {"unread": 0}
    # Written into the inbox is delivered: the funnel counts it so.
    wh = warehouse.connect(settings)
    try:
        codes = wait_for(
            lambda: (c := Counter(r["code"] for r in outcomes(wh, "ib")))["delivered"] == 3 and c,
            timeout_s=30, what="3 delivered inbox messages",
        )  # fmt: skip
        assert codes["sent"] == 3
    finally:
        wh.close()


def test_an_undelivered_receipt_or_no_receipt_in_time_starts_the_next_channel(worker) -> None:
    settings = worker
    base = settings.sandbox_base
    twilio = ProviderRoute(provider="twilio", url=f"{base}/twilio", options={"from": "+15550000"})
    documents = [
        Channel(id="nr-sms", provider="twilio", providers=[twilio], format="sms", address_field="phone"),
        Channel(id="nr-quiet", provider="http-sms", url=f"{base}/http-sms", format="sms", address_field="phone"),
        Channel(id="nr-hook", provider="webhook", url=f"{base}/webhook/nr"),
        Template(id="nr-t", body="${name}, your code is ready"),
        Campaign(
            id="nr-undelivered", name="u", trigger=Trigger(event_type="nr_go"), channel="nr-sms",
            fallback_channels=["nr-hook"], template_id="nr-t", daily_cap=1000,
        ),
        Campaign(
            id="nr-silent", name="s", trigger=Trigger(event_type="nr_go"), channel="nr-quiet",
            fallback_channels=["nr-hook"], fallback_after_s=1, template_id="nr-t", daily_cap=1000,
        ),
    ]  # fmt: skip
    publish(settings, documents, [{"user_id": "nr-user", "name": "Eve", "phone": "+15550500001"}])
    faults(settings, "twilio", undelivered_rate=1.0)
    faults(settings, "http-sms", receipts=False)
    wh = warehouse.connect(settings)
    try:
        fire(settings, "nr_go", ["nr-user"])

        def hooks() -> Counter:
            return Counter(
                b["campaign_id"] for b in received(settings, "webhook") if b["campaign_id"].startswith("nr-")
            )

        wait_for(lambda: hooks() == {"nr-undelivered": 1, "nr-silent": 1}, timeout_s=60, what="both fallbacks")
        undelivered = outcomes(wh, "nr-undelivered")
        assert {(r["channel"], r["code"]) for r in undelivered} >= {("nr-sms", "sent"), ("nr-sms", "undelivered")}
        silent = {(r["channel"], r["code"]) for r in outcomes(wh, "nr-silent")}
        assert ("nr-quiet", "sent") in silent and ("nr-quiet", "delivered") not in silent
        assert hooks() == {"nr-undelivered": 1, "nr-silent": 1}  # once each, never again
    finally:
        faults(settings, "twilio", undelivered_rate=0.0)
        faults(settings, "http-sms", receipts=True)
        wh.close()
