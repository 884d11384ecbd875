from __future__ import annotations

from datetime import UTC, datetime

import pytest

from connectors.channels.base import DeliveryResult, DeliveryStatus
from infra import topics
from schemas.config import Campaign, Trigger
from schemas.models import OutcomeCode, Priority, RenderedMessage
from streams.dispatch import backoff_s, outcome_for
from streams.throttle import cap_key, cap_limit, capped, dispatch_topic

pytestmark = pytest.mark.unit


def rendered(priority: Priority = Priority.normal) -> RenderedMessage:
    return RenderedMessage(
        message_id="m",
        campaign_id="c",
        user_id="u",
        channel="webhook",
        priority=priority,
        triggered_at=datetime(2026, 1, 1, tzinfo=UTC),
        address="u",
        body="b",
    )


@pytest.mark.parametrize(("priority", "topic"), [(p, topics.DISPATCH[p.value].name) for p in Priority])
def test_priority_picks_the_dispatch_topic(priority, topic) -> None:
    assert dispatch_topic(rendered(priority)) == topic


def test_cap_key_is_per_user_and_day() -> None:
    assert cap_key("u1", datetime(2026, 11, 24, 23, 59, tzinfo=UTC)) == "cap:day:u1:20261124"


def test_cap_limit_prefers_the_campaign() -> None:
    campaign = Campaign(id="c", name="c", trigger=Trigger(event_type="t"), channel="w", template_id="t", daily_cap=2)
    assert (cap_limit(campaign, 5), cap_limit(None, 5)) == (2, 5)
    assert capped(rendered(), 2).code is OutcomeCode.capped


# (result, expected code)
RESULTS = [
    (DeliveryResult(status=DeliveryStatus.accepted, provider_message_id="p1"), OutcomeCode.sent),
    (DeliveryResult(status=DeliveryStatus.failed, retryable=True, error_code="http_503"), OutcomeCode.failed),
]


@pytest.mark.parametrize(("result", "code"), RESULTS)
def test_outcome_for(result, code) -> None:
    outcome = outcome_for(rendered(), "webhook", result, attempts=3)
    assert outcome.code is code and outcome.provider == "webhook"
    assert (outcome.reason is None) == (code is OutcomeCode.sent)


def test_backoff_grows() -> None:
    assert [backoff_s(a) for a in (1, 2, 3)] == [0.2, 0.4, 0.8]
