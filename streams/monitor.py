"""Monitor: the delivery rate of every (channel, provider) over a sliding window against its own
baseline; a sudden drop opens one alert (loopcast.alerts, ClickHouse, the operators' channel),
and one more says when it has recovered.

The counts live in Redis buckets shared by every worker (connectors.monitor_store), so any number of
workers see the same rates; the open/closed state is taken atomically, so one alert fires once.
A provider that goes silent (no outcomes at all) is not judged here: with nothing to count there is
no rate. That needs a timer over the known subjects (a `provider_silent` alert), not this stage.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel

from infra import topics
from infra.settings import MonitorSettings
from schemas.models import Alert, Outcome, OutcomeCode, Priority, RenderedMessage, Severity

DROP = "delivery_rate_drop"
RECOVERED = "delivery_rate_recovered"
# The operators' messages travel as a campaign of their own, so reports can tell them apart.
ALERT_CAMPAIGN = "loopcast-alerts"

FAILURES = frozenset({OutcomeCode.failed, OutcomeCode.undelivered, OutcomeCode.retrying})


@dataclass(frozen=True)
class Tally:
    ok: int = 0
    bad: int = 0

    @property
    def samples(self) -> int:
        return self.ok + self.bad

    @property
    def rate(self) -> float:
        return self.ok / self.samples if self.samples else 0.0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.ok + other.ok, self.bad + other.bad)


Subject = tuple[str, str]  # (channel id, provider scheme)
Counts = Mapping[int, Tally]  # bucket index -> tally


class OpenAlert(BaseModel):
    """An open drop, kept in Redis while it lasts: recovery is judged against the baseline it fell
    from, since the sliding baseline takes in the bad rate itself once the drop is older than the window."""

    alert_id: str
    baseline: float
    current: float
    opened_at: float  # unix seconds
    severity: Severity


@dataclass(frozen=True)
class Change:
    """What a batch's counts mean for one subject: an alert to open, or the open one to close."""

    kind: str  # DROP or RECOVERED
    state: OpenAlert
    current: Tally


def subject_name(subject: Subject) -> str:
    return f"{subject[0]}/{subject[1]}"


@functools.cache
def reports_delivery(provider: str) -> bool:
    """Whether this provider ever says `delivered` (receipts, or accepted-is-delivered): then success is
    `delivered` and `sent` is only a step; otherwise `sent` is all it will ever say."""
    from connectors.channels.base import adapter_class

    try:
        cls = adapter_class(provider)
    except (LookupError, ImportError, AttributeError):
        return False
    return cls.sends_receipts or cls.delivers_on_accept


def health(outcome: Outcome) -> bool | None:
    """True for a success, False for a failure (a retryable one too), None for what says nothing
    about the provider (suppressions, clicks, `sent` of a provider whose receipts follow).
    Outcomes without a provider (no healthy route at all) are not any provider's rate."""
    if outcome.provider is None:
        return None
    if outcome.code in FAILURES:
        return False
    if outcome.code is OutcomeCode.delivered:
        return True
    if outcome.code is OutcomeCode.sent:
        return None if reports_delivery(outcome.provider) else True
    return None


@dataclass(frozen=True)
class Windows:
    """The bucket ranges (inclusive) the monitor compares, for one moment."""

    now: int
    window: range
    baseline: range
    recovery: range

    @property
    def oldest(self) -> int:
        return min(self.baseline.start, self.recovery.start)


def bucket_of(t: float, cfg: MonitorSettings) -> int:
    return math.floor(t / cfg.bucket_s)


def buckets(seconds: float, cfg: MonitorSettings) -> int:
    return max(1, math.ceil(seconds / cfg.bucket_s - 1e-9))


def windows(now: float, cfg: MonitorSettings) -> Windows:
    """The window ends with the current (partial) bucket; the baseline is the span just before it."""
    b = bucket_of(now, cfg)
    w, base, rec = buckets(cfg.window_s, cfg), buckets(cfg.baseline_s, cfg), buckets(cfg.recover_s, cfg)
    return Windows(b, range(b - w + 1, b + 1), range(b - w - base + 1, b - w + 1), range(b - rec + 1, b + 1))


def tally(outcomes: Iterable[Outcome], now: float, cfg: MonitorSettings) -> dict[Subject, dict[int, Tally]]:
    """A batch's outcomes as counts per subject and bucket (by when each happened; a clock ahead of
    ours counts now, anything older than the baseline is history and left out)."""
    span = windows(now, cfg)
    raw: dict[tuple[Subject, int], list[int]] = {}  # plain counters: this loop runs per outcome
    for outcome in outcomes:
        ok = health(outcome)
        if ok is None:
            continue
        bucket = min(math.floor(outcome.occurred_at.timestamp() / cfg.bucket_s), span.now)
        if bucket < span.oldest:
            continue
        key = ((outcome.channel, outcome.provider), bucket)
        if (counter := raw.get(key)) is None:
            counter = raw[key] = [0, 0]
        counter[0 if ok else 1] += 1
    counts: dict[Subject, dict[int, Tally]] = {}
    for (subject, bucket), (good, bad) in raw.items():
        counts.setdefault(subject, {})[bucket] = Tally(good, bad)
    return counts


def total(counts: Counts, span: range) -> Tally:
    result = Tally()
    for b in span:
        if b in counts:
            result = result + counts[b]
    return result


def dropped(current: Tally, baseline: Tally, cfg: MonitorSettings) -> bool:
    """Below the baseline by more than the margin and by more than chance explains (z standard errors
    of a binomial rate, both samples' uncertainty), with enough outcomes in both to say so."""
    if current.samples < cfg.min_samples or baseline.samples < cfg.min_baseline_samples:
        return False
    p = baseline.rate
    se = math.sqrt(p * (1 - p) * (1 / current.samples + 1 / baseline.samples))
    return current.rate < p - max(cfg.margin, cfg.z * se)


def assess(
    subject: Subject, counts: Counts, now: float, cfg: MonitorSettings, open_alert: OpenAlert | None
) -> Change | None:
    """The one decision: open a drop when closed, close it when recovered; else nothing (no storm)."""
    span = windows(now, cfg)
    current = total(counts, span.window)
    if open_alert is None:
        baseline = total(counts, span.baseline)
        if not dropped(current, baseline, cfg):
            return None
        # A drop is caught while the window still holds some good seconds: its newest third says how
        # deep it really is (when that third has enough outcomes to say anything).
        newest = total(counts, span.window[-max(1, len(span.window) // 3) :])
        lowest = newest if newest.samples * 2 >= cfg.min_samples and newest.rate < current.rate else current
        depth = baseline.rate - lowest.rate
        state = OpenAlert(
            alert_id=f"{DROP}:{subject_name(subject)}:{int(now * 1000)}",
            baseline=baseline.rate,
            current=lowest.rate,
            opened_at=now,
            severity=Severity.critical if depth >= cfg.critical_drop else Severity.warning,
        )
        return Change(DROP, state, lowest)
    # Recovered only after a whole recovery span since the drop, its rate (and the window's) back near
    # the old baseline: the smaller recover_margin against the drop's margin is the hysteresis.
    if now - open_alert.opened_at < cfg.recover_s:
        return None
    recent = total(counts, span.recovery)
    if recent.samples < cfg.min_samples or current.samples < cfg.min_samples:
        return None
    floor = open_alert.baseline - cfg.recover_margin
    if recent.rate >= floor and current.rate >= floor:
        return Change(RECOVERED, open_alert, recent)
    return None


def _at(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def alert_of(subject: Subject, change: Change, now: float, cfg: MonitorSettings) -> Alert:
    """The Alert record, with a text an operator reads: what, from what to what, since when."""
    channel, provider = subject
    state = change.state
    if change.kind == DROP:
        text = (
            f"Delivery rate of channel {channel} via {provider} dropped from {state.baseline:.1%} to "
            f"{change.current.rate:.1%} ({change.current.bad} of the latest {change.current.samples} outcomes "
            f"failed; baseline over {cfg.baseline_s:g} s) since {_at(state.opened_at)}."
        )
        return Alert(
            alert_id=state.alert_id,
            kind=DROP,
            severity=state.severity,
            subject=subject_name(subject),
            message=text,
            value=round(change.current.rate, 4),
        )
    text = (
        f"Delivery rate of channel {channel} via {provider} recovered: {change.current.rate:.1%} over the last "
        f"{cfg.recover_s:g} s (baseline {state.baseline:.1%}); it had dropped to {state.current:.1%} at "
        f"{_at(state.opened_at)}, {_duration(now - state.opened_at)} ago."
    )
    return Alert(
        alert_id=state.alert_id.replace(DROP, RECOVERED, 1),
        kind=RECOVERED,
        severity=Severity.info,
        subject=subject_name(subject),
        message=text,
        value=round(change.current.rate, 4),
    )


def operator_message(alert: Alert, channel_id: str) -> RenderedMessage:
    """The alert as a message for the operators' channel, sent by the dispatch stage like any other.

    Why through loopcast.dispatch.high rather than a send from here: dispatch already has the
    adapters, the provider's shared rate limit (a WeCom bot takes 20 a minute), retries with
    backoff, failover and the send claim (the alert id makes the message id, so a redelivered batch
    never pages twice), and records the outcome; the monitor's batch never waits on an HTTP call.
    Going straight to dispatch skips the throttle, so no cap or quiet hours hold an alert back."""
    icon = {"critical": "🔴", "warning": "🟠", "info": "🟢"}[alert.severity.value]
    return RenderedMessage(
        message_id=f"alert:{alert.alert_id}",
        campaign_id=ALERT_CAMPAIGN,
        user_id="operators",
        channel=channel_id,
        priority=Priority.high,
        triggered_at=alert.occurred_at,
        address="operators",
        title=f"{icon} Loopcast {alert.severity.value}: {alert.kind} {alert.subject}",
        body=f"{icon} Loopcast {alert.severity.value}: {alert.kind} {alert.subject}\n{alert.message}",
    )


# --- the agent ---------------------------------------------------------------------------------


async def handle(rt, out, outcomes: list[Outcome]) -> None:
    """Count the batch into the shared buckets and read them back (one round trip), then open or
    close alerts; an alert is produced only by the worker whose atomic open/close won."""
    from connectors.monitor_store import MonitorStore

    cfg = rt.settings.monitor
    now = time.time()
    counts = tally(outcomes, now, cfg)
    if not counts:
        return
    store = MonitorStore(rt.user_state.redis, rt.settings.app_id, cfg)
    seen, states = await store.add_and_read(counts, windows(now, cfg))
    for subject in sorted(counts):
        change = assess(subject, seen[subject], now, cfg, states.get(subject))
        if change is None:
            continue
        won = await store.open(subject, change.state) if change.kind == DROP else await store.close(subject)
        if not won:
            continue  # another worker opened (or closed) it first
        alert = alert_of(subject, change, now, cfg)
        out.send(topics.ALERTS.name, alert.subject, alert)
        notify(rt, out, alert, subject)


def notify(rt, out, alert: Alert, subject: Subject) -> None:
    channel_id = rt.settings.alert_channel
    # A broken operators' channel is not told about itself; its alert still reaches the topic and ClickHouse.
    if not channel_id or subject[0] == channel_id or rt.config.channel(channel_id) is None:
        return
    message = operator_message(alert, channel_id)
    out.send(topics.DISPATCH_HIGH.name, message.user_id, message)
