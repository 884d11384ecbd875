"""Provider routes: weighted choice, circuit breakers, backoff with jitter — pure, no services."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from schemas.config import Campaign, Trigger
from schemas.models import MatchedMessage, Priority
from streams.failover import BACKOFF_CAP_S, Breaker, Routes, backoff_s
from streams.match import fallback_message

pytestmark = pytest.mark.unit

KEYS = ["sms/0:twilio", "sms/1:aliyun-sms"]


def test_weights_share_the_traffic_and_each_message_keeps_its_route() -> None:
    routes = Routes()
    picks = Counter(routes.choose(KEYS, [3, 1], f"m{i}", set(), 0.0) for i in range(4000))
    assert 0.70 < picks[0] / 4000 < 0.80
    assert routes.choose(KEYS, [3, 1], "m7", set(), 0.0) == routes.choose(KEYS, [3, 1], "m7", set(), 0.0)


def test_a_failed_route_is_skipped_for_that_message() -> None:
    routes = Routes()
    assert routes.choose(KEYS, [1, 1], "m", {KEYS[0]}, 0.0) == 1
    assert routes.choose(KEYS, [1, 1], "m", set(KEYS), 0.0) is None


def test_a_standby_takes_traffic_only_when_the_weighted_routes_cannot() -> None:
    routes = Routes()
    assert {routes.choose(KEYS, [1, 0], f"m{i}", set(), 0.0) for i in range(100)} == {0}
    assert routes.choose(KEYS, [1, 0], "m", {KEYS[0]}, 0.0) == 1


def test_an_outage_opens_the_breaker_then_one_probe_closes_it() -> None:
    routes = Routes(open_s=2.0)
    for t in range(5):
        routes.record(KEYS[0], False, t * 0.01)
    assert routes.breaker(KEYS[0]).state == "open"
    assert {routes.choose(KEYS, [1, 1], f"m{i}", set(), 0.1) for i in range(50)} == {1}
    # After open_s one message probes the primary; the others keep going to the backup meanwhile.
    probes = [routes.choose(KEYS, [100, 1], f"p{i}", set(), 2.2) for i in range(20)]
    assert probes.count(0) == 1
    routes.record(KEYS[0], True, 2.3)
    assert routes.breaker(KEYS[0]).state == "closed"


def test_a_failed_probe_opens_again_and_a_lost_probe_expires() -> None:
    b = Breaker(open_s=1.0)
    for _ in range(5):
        b.record(False, 0.0)
    assert b.available(1.0)
    b.chosen(1.0)
    assert not b.available(1.5)
    b.record(False, 1.6)
    assert b.state == "open" and not b.available(2.0) and b.available(2.7)
    b.chosen(2.7)
    assert b.available(3.8)  # the probe never reported: another may go


def test_a_busy_providers_good_past_does_not_hide_its_outage() -> None:
    b = Breaker()
    for i in range(3000):
        b.record(True, i * 0.001)
    for i in range(5):
        b.record(False, 3 + i * 0.001)
    assert b.state == "open"


def test_mostly_healthy_stays_closed() -> None:
    b = Breaker()
    for i in range(100):
        b.record(i % 10 != 0, i * 0.05)
    assert b.state == "closed"


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    rng = random.Random(1)
    delays = [backoff_s(a, rng=rng) for a in (1, 2, 3, 4)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = 0.5 * 2 ** (attempt - 1)
        assert ceiling / 2 <= delay <= ceiling
    assert backoff_s(30) <= BACKOFF_CAP_S
    assert backoff_s(1, retry_after_s=7) == 7


def test_fallback_walks_the_channels_once_with_lineage() -> None:
    campaign = Campaign(
        id="c", name="c", trigger=Trigger(event_type="e"), channel="push", fallback_channels=["sms"], template_id="t"
    )
    first = MatchedMessage(
        message_id="m-push", campaign_id="c", user_id="u", event_id="e1", event_type="e", channel="push",
        priority=Priority.normal, triggered_at="2026-11-24T12:00:00Z",
    )  # fmt: skip
    second = fallback_message(first, campaign)
    assert second.channel == "sms" and second.fallback_of == "m-push" and second.message_id != "m-push"
    assert fallback_message(first, campaign).message_id == second.message_id  # deterministic: once
    assert fallback_message(second, campaign) is None
    with pytest.raises(ValueError, match="repeat"):
        Campaign(
            id="c", name="c", trigger=Trigger(event_type="e"), channel="sms", fallback_channels=["sms"], template_id="t"
        )
