from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from connectors.channels.base import DeliveryResult, DeliveryStatus
from connectors.policy_store import AdmitRequest
from infra import topics
from schemas.config import Campaign, Trigger
from schemas.models import OutcomeCode, Priority, RenderedMessage
from streams.dispatch import claim_id, outcome_for
from streams.policy import Category, Preferences, QuietHours
from streams.throttle import dispatch_topic, judge, parse_quiet_hours

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
NIGHT = datetime(2026, 11, 24, 23, 0, tzinfo=UTC)


def rendered(priority: Priority = Priority.normal, triggered_at: datetime = NOW) -> RenderedMessage:
    return RenderedMessage(
        message_id="m",
        campaign_id="c",
        user_id="u",
        channel="webhook",
        priority=priority,
        triggered_at=triggered_at,
        address="u",
        body="b",
    )


def campaign(**kw) -> Campaign:
    return Campaign(
        **{"id": "c", "name": "c", "trigger": Trigger(event_type="t"), "channel": "webhook", "template_id": "t", **kw}
    )


def verdict(message=None, camp=None, prefs=None, now=NOW, quiet="22:00-08:00"):
    return judge(
        message or rendered(),
        camp or campaign(),
        prefs or Preferences(),
        now=now,
        global_quiet=parse_quiet_hours(quiet),
        default_timezone="UTC",
        daily_cap=5,
    )


@pytest.mark.parametrize(("priority", "topic"), [(p, topics.DISPATCH[p.value].name) for p in Priority])
def test_priority_picks_the_dispatch_topic(priority, topic) -> None:
    assert dispatch_topic(rendered(priority)) == topic


# (case, kwargs, expected outcome code | "defer" | "admit")
CASES = [
    ("daytime marketing", {}, "admit"),
    ("global opt-out", {"prefs": Preferences(opted_out=True)}, OutcomeCode.opted_out),
    (
        "opt-out spares transactional",
        {"prefs": Preferences(opted_out=True), "camp": campaign(category=Category.transactional)},
        "admit",
    ),
    (
        "channel block binds transactional",
        {"prefs": Preferences(blocked_channels={"webhook"}), "camp": campaign(category=Category.transactional)},
        OutcomeCode.opted_out,
    ),
    ("night: deferred", {"now": NIGHT}, "defer"),
    ("night, quiet hours off", {"now": NIGHT, "quiet": "off"}, "admit"),
    ("night, campaign's own window", {"now": NIGHT, "camp": campaign(quiet_hours=QuietHours(enabled=False))}, "admit"),
    ("night, transactional is urgent", {"now": NIGHT, "camp": campaign(category=Category.transactional)}, "admit"),
    ("night, stale by morning", {"now": NIGHT, "camp": campaign(max_age_minutes=60)}, OutcomeCode.expired),
    ("in Los Angeles it is afternoon", {"now": NIGHT, "prefs": Preferences(timezone="America/Los_Angeles")}, "admit"),
    ("in Shanghai it is 7:00, still quiet", {"now": NIGHT, "prefs": Preferences(timezone="Asia/Shanghai")}, "defer"),
]


@pytest.mark.parametrize(("case", "kwargs", "expected"), CASES, ids=[c[0] for c in CASES])
def test_judge(case, kwargs, expected) -> None:
    result = verdict(**kwargs)
    if expected == "admit":
        assert isinstance(result, AdmitRequest) and result.dedup_key == "dedup:m"
    elif expected == "defer":
        until, outcome = result
        assert (
            until > kwargs.get("now", NOW) and outcome.code is OutcomeCode.deferred and "quiet hours" in outcome.reason
        )
    else:
        assert result.code is expected and result.reason


def test_deferred_until_the_local_end_of_quiet_hours() -> None:
    assert verdict(now=NIGHT)[0] == datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
    # 08:00 in Shanghai is midnight UTC.
    assert verdict(now=NIGHT, prefs=Preferences(timezone="Asia/Shanghai"))[0] == datetime(
        2026, 11, 25, 0, 0, tzinfo=UTC
    )


def test_caps_use_the_campaign_cap_and_skip_transactional() -> None:
    checks = verdict(camp=campaign(daily_cap=2)).checks
    assert [(key, limit) for key, limit, *_ in checks] == [("cap:user_daily:u:20261124", 2)]
    assert verdict(camp=campaign(category=Category.transactional)).checks == []


def test_parse_quiet_hours() -> None:
    assert parse_quiet_hours("21:30-07:00") == QuietHours(start=time(21, 30), end=time(7))
    assert parse_quiet_hours("off").enabled is False


# (result, expected code)
RESULTS = [
    (DeliveryResult(status=DeliveryStatus.accepted, provider_message_id="p1"), 1, OutcomeCode.sent),
    (DeliveryResult(status=DeliveryStatus.failed, retryable=True, error_code="http_503"), 1, OutcomeCode.retrying),
    (DeliveryResult(status=DeliveryStatus.failed, retryable=True, error_code="http_503"), 5, OutcomeCode.failed),
    (DeliveryResult(status=DeliveryStatus.failed, retryable=False, error_code="http_401"), 1, OutcomeCode.failed),
]


@pytest.mark.parametrize(("result", "attempt", "code"), RESULTS)
def test_outcome_for(result, attempt, code) -> None:
    outcome = outcome_for(rendered(), "webhook", result, attempt)
    assert outcome.code is code and outcome.provider == "webhook" and outcome.attempt == attempt
    assert (outcome.reason is None) == (code is OutcomeCode.sent)


def test_each_attempt_is_claimed_once() -> None:
    first = rendered()
    assert claim_id(first) == "m"
    assert claim_id(first.model_copy(update={"attempt": 3})) == "m#3"


def test_a_phone_makers_push_limit_counts_on_its_push_channel() -> None:
    from schemas.config import Channel
    from streams.throttle import push_vendor

    huawei = Channel(id="hw", provider="huawei-push", format="push-huawei")
    assert push_vendor(huawei) == "huawei" and push_vendor(Channel(id="w", provider="webhook")) is None
    request = judge(
        rendered(), campaign(), Preferences(), now=NOW, global_quiet=QuietHours(enabled=False),
        default_timezone="UTC", daily_cap=5, vendor=push_vendor(huawei),
    )  # fmt: skip
    assert [(key.split(":")[1], limit) for key, limit, *_ in request.checks] == [
        ("user_daily", 5),
        ("vendor_push_daily", 2),
    ]
