"""The delivery-rate monitor's decisions, without Kafka or Redis: second by second traffic through
`assess`, with the open alert kept the way the store keeps it."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from infra.settings import MonitorSettings, Settings
from schemas.models import Outcome, OutcomeCode, Priority, Severity
from streams.monitor import (
    ALERT_CAMPAIGN,
    DROP,
    RECOVERED,
    Tally,
    alert_of,
    assess,
    bucket_of,
    health,
    operator_message,
    tally,
    windows,
)
from streams.topology import BULK_LANE, STAGES, URGENT_LANE, select

pytestmark = pytest.mark.unit

CFG = Settings(
    monitor_bucket_s=1,
    monitor_window_s=10,
    monitor_baseline_s=60,
    monitor_min_samples=20,
    monitor_min_baseline_samples=50,
    monitor_recover_s=10,
).monitor
SUBJECT = ("shop-hook", "webhook")
T0 = 1_800_000_000.0


def simulate(seconds: list[tuple[int, int]], cfg: MonitorSettings = CFG, seed_counts=None) -> list[tuple[int, str]]:
    """(ok, bad) outcomes per second; returns (second, alert kind) for every alert that fired."""
    counts: dict[int, Tally] = dict(seed_counts or {})
    state = None
    fired = []
    for i, (ok, bad) in enumerate(seconds):
        now = T0 + i + 0.5
        b = bucket_of(now, cfg)
        counts[b] = counts.get(b, Tally()) + Tally(ok, bad)
        change = assess(SUBJECT, counts, now, cfg, state)
        if change is None:
            continue
        fired.append((i, change.kind))
        state = change.state if change.kind == DROP else None
    return fired


def traffic(rate: float, seconds: int, per_second: int = 20, seed: int = 7) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(seconds):
        ok = sum(rng.random() < rate for _ in range(per_second))
        out.append((ok, per_second - ok))
    return out


def test_noise_around_a_steady_rate_raises_nothing() -> None:
    assert simulate(traffic(0.95, 900)) == []


def test_too_few_samples_say_nothing_even_at_zero() -> None:
    # One outcome a second, all good, then all failing: never 20 in a 10 s window.
    assert simulate([(1, 0)] * 120 + [(0, 1)] * 120) == []


def test_a_quiet_baseline_says_nothing() -> None:
    # 30 outcomes in the baseline (< 50), then a full window of failures.
    assert simulate([(1, 0)] * 30 + [(0, 20)] * 10) == []


def test_a_sudden_drop_fires_once_within_seconds_and_stays_quiet_while_down() -> None:
    fired = simulate(traffic(0.97, 120) + traffic(0.2, 400, seed=8))
    assert fired[0][1] == DROP and fired[0][0] - 120 <= 3
    assert len(fired) == 1, fired  # 400 s down, past the baseline span, and still one alert


def test_drop_depth_sets_severity() -> None:
    base = traffic(0.97, 120)
    for rate, severity in ((0.2, Severity.critical), (0.78, Severity.warning)):
        counts: dict[int, Tally] = {}
        state = None
        for i, (ok, bad) in enumerate(base + traffic(rate, 30, seed=3)):
            now = T0 + i + 0.5
            counts[bucket_of(now, CFG)] = Tally(ok, bad)
            change = assess(SUBJECT, counts, now, CFG, state)
            if change:
                state = change.state
                break
        assert state is not None and state.severity is severity, rate
        assert state.baseline > 0.9


def test_recovery_fires_once_after_the_rate_is_back_for_a_while() -> None:
    fired = simulate(traffic(0.97, 120) + traffic(0.2, 60, seed=2) + traffic(0.97, 200, seed=3))
    kinds = [k for _, k in fired]
    assert kinds == [DROP, RECOVERED], fired
    recovered_at = fired[1][0]
    assert 180 + CFG.recover_s - 1 <= recovered_at <= 180 + 3 * CFG.recover_s


def test_a_half_recovery_keeps_the_alert_open() -> None:
    # From 97 % down to 20 %, back to 80 % only: still well under the old baseline.
    fired = simulate(traffic(0.97, 120) + traffic(0.2, 60, seed=2) + traffic(0.8, 300, seed=3))
    assert [k for _, k in fired] == [DROP]


def test_a_slow_drift_is_not_a_drop_but_the_same_fall_at_once_is() -> None:
    # 97 % to 60 % over two hours: the baseline follows, no window is ever far below it.
    hours = 7200
    drift = [(round(20 * r), 20 - round(20 * r)) for r in (0.97 - 0.37 * i / hours for i in range(hours))]
    assert simulate(drift) == []
    assert [k for _, k in simulate(traffic(0.97, 120) + traffic(0.6, 60))] == [DROP]


def test_a_second_drop_after_recovery_opens_a_new_alert() -> None:
    fired = simulate(
        traffic(0.97, 120) + traffic(0.1, 40, seed=2) + traffic(0.97, 120, seed=3) + traffic(0.1, 40, seed=4)
    )
    assert [k for _, k in fired] == [DROP, RECOVERED, DROP]


def outcome(code: OutcomeCode, provider: str | None = "webhook", at: float = T0, channel: str = "shop-hook") -> Outcome:
    when = datetime.fromtimestamp(at, UTC)
    return Outcome(
        message_id="m",
        campaign_id="c",
        user_id="u",
        channel=channel,
        code=code,
        stage="dispatch",
        provider=provider,
        triggered_at=when,
        occurred_at=when,
    )


@pytest.mark.parametrize(
    ("code", "provider", "expected"),
    [
        (OutcomeCode.delivered, "webhook", True),
        (OutcomeCode.undelivered, "webhook", False),
        (OutcomeCode.failed, "webhook", False),
        (OutcomeCode.retrying, "webhook", False),
        (OutcomeCode.sent, "webhook", None),  # its receipt follows and counts
        (OutcomeCode.sent, "wecom-bot", True),  # no receipts: sent is all it says
        (OutcomeCode.sent, "inbox", None),  # accepted is delivered: the delivered outcome counts
        (OutcomeCode.delivered, "inbox", True),
        (OutcomeCode.clicked, "webhook", None),
        (OutcomeCode.capped, None, None),
        (OutcomeCode.failed, None, None),  # no provider was healthy: nobody's rate
    ],
)
def test_what_counts_as_success_and_failure(code: OutcomeCode, provider: str | None, expected: bool | None) -> None:
    assert health(outcome(code, provider)) is expected


def test_tally_buckets_by_when_it_happened_and_drops_history() -> None:
    now = T0 + 100.5
    counts = tally(
        [
            outcome(OutcomeCode.delivered, at=now - 1),
            outcome(OutcomeCode.undelivered, at=now - 1),
            outcome(OutcomeCode.delivered, at=now + 30),  # a clock ahead of ours: counted now
            outcome(OutcomeCode.delivered, at=now - 3600),  # older than the baseline: left out
            outcome(OutcomeCode.sent, "wecom-bot", at=now, channel="ops"),
            outcome(OutcomeCode.clicked, at=now),
        ],
        now,
        CFG,
    )
    b = bucket_of(now, CFG)
    assert counts == {SUBJECT: {b - 1: Tally(1, 1), b: Tally(1, 0)}, ("ops", "wecom-bot"): {b: Tally(1, 0)}}
    span = windows(now, CFG)
    assert len(span.window) == 10 and len(span.baseline) == 60 and span.baseline.stop == span.window.start


def test_alert_texts_say_what_from_what_to_what_and_since_when() -> None:
    counts: dict[int, Tally] = {}
    state, texts = None, []
    for i, (ok, bad) in enumerate([(19, 1)] * 120 + [(4, 16)] * 30 + [(20, 0)] * 30):
        now = T0 + i + 0.5
        counts[bucket_of(now, CFG)] = Tally(ok, bad)
        change = assess(SUBJECT, counts, now, CFG, state)
        if change:
            alert = alert_of(SUBJECT, change, now, CFG)
            texts.append(alert)
            state = change.state if change.kind == DROP else None
    drop, recovered = texts
    assert (drop.kind, drop.subject, drop.severity) == (DROP, "shop-hook/webhook", Severity.critical)
    assert "from 95.0% to" in drop.message and "since 2027-01-15" in drop.message
    assert recovered.kind == RECOVERED and recovered.severity is Severity.info
    assert recovered.alert_id.endswith(drop.alert_id.split(":", 1)[1])
    message = operator_message(drop, "ops-alerts")
    assert (message.channel, message.priority, message.campaign_id) == ("ops-alerts", Priority.high, ALERT_CAMPAIGN)
    assert message.message_id == f"alert:{drop.alert_id}" and drop.message in message.body


def test_the_two_lanes_together_run_every_stage_once() -> None:
    urgent = {s.name for s in select(list(URGENT_LANE))}
    bulk = {s.name for s in select(list(BULK_LANE))}
    assert urgent | bulk == {s.name for s in STAGES} and not urgent & bulk
    assert {"monitor", "feedback.alerts"} <= bulk
