"""Send policy for the throttle stage: consent, quiet hours, frequency caps and dedup, as pure functions.

No I/O and no clock of its own: every time-dependent call takes `now`. The stage evaluates these, then
hands the resulting cap checks to one Redis script that checks and counts them all atomically.
"""

from __future__ import annotations

import math
import unicodedata
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.models import Priority

# --- Categories and preferences ---------------------------------------------------------------------------------


class Category(StrEnum):
    marketing = "marketing"
    service = "service"
    transactional = "transactional"


class Preferences(BaseModel):
    """One user's consent, stored as JSON in Redis; unknown keys are ignored so older workers read newer data."""

    model_config = ConfigDict(extra="ignore")
    # Global opt-out: transactional messages (receipts, one-time codes) still go out, on unblocked channels.
    opted_out: bool = False
    # Channels the user refused: binding for everything, transactional included.
    blocked_channels: set[str] = Field(default_factory=set)
    blocked_categories: set[Category] = Field(default_factory=set)
    preferred_channel: str | None = None
    # IANA name; None means the deployment's default time zone.
    timezone: str | None = None


def preference_verdict(prefs: Preferences, channel: str, category: Category) -> str | None:
    """None if the user accepts this message, else the reason (reported with outcome opted_out)."""
    if channel in prefs.blocked_channels:
        return f"user blocked channel {channel}"
    # Transactional messages are part of a service the user asked for; only a channel block stops them.
    if category is Category.transactional:
        return None
    if prefs.opted_out:
        return "user opted out of all but transactional messages"
    if category in prefs.blocked_categories:
        return f"user opted out of {category} messages"
    return None


# Whole-message reply keywords. TD/T/退订 are the Chinese SMS convention ("回T退订"); the rest are the
# CTIA/carrier opt-out words. Matching is on the whole reply so "stop by later" never unsubscribes anyone.
UNSUBSCRIBE_KEYWORDS = frozenset({"TD", "T", "退订", "STOP", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "STOPALL"})


def _normalise_reply(text: str) -> str:
    # NFKC folds full-width letters (ＴＤ) typed on Chinese keyboards; punctuation, symbols and spaces are dropped.
    folded = unicodedata.normalize("NFKC", text)
    kept = (ch for ch in folded if unicodedata.category(ch)[0] not in "PZSC")
    return "".join(kept).upper()


def unsubscribe_keyword(text: str) -> bool:
    """True if an SMS reply, as a whole, is an unsubscribe keyword (case, space and punctuation ignored)."""
    return _normalise_reply(text) in UNSUBSCRIBE_KEYWORDS


def apply_unsubscribe(prefs: Preferences, *, channel: str | None, category: Category | None) -> Preferences:
    """The preferences after an unsubscribe; neither channel nor category means a global opt-out.

    Each given dimension is blocked. A keyword reply to a marketing SMS is best recorded as category=marketing
    alone: blocking the channel would also stop the user's one-time codes on it. Transactional messages cannot
    be unsubscribed by category, so that request is taken as a global opt-out (which still lets them through).
    """
    update: dict[str, object] = {}
    if channel is not None:
        update["blocked_channels"] = prefs.blocked_channels | {channel}
    if category is not None and category is not Category.transactional:
        update["blocked_categories"] = prefs.blocked_categories | {category}
    if not update:
        update["opted_out"] = True
    return prefs.model_copy(update=update)


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def resolve_timezone(name: str | None, default: str) -> str:
    """The user's zone if it is a known IANA name, else the default: a bad profile must not stop the stage."""
    if name:
        try:
            _zone(name)
            return name
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return default


def _aware(value: datetime) -> datetime:
    # Same convention as schemas.models: naive times are UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


# --- Quiet hours -------------------------------------------------------------------------------------------------


class QuietHours(BaseModel):
    """A daily window of local wall time, [start, end); start after end wraps midnight, start == end is empty."""

    model_config = ConfigDict(extra="forbid")
    start: time = time(22)
    end: time = time(8)
    enabled: bool = True

    def contains(self, wall: time) -> bool:
        if not self.enabled or self.start == self.end:
            return False
        if self.start < self.end:
            return self.start <= wall < self.end
        return wall >= self.start or wall < self.end


def effective_quiet(campaign: QuietHours | None, default: QuietHours) -> QuietHours:
    """A campaign's own quiet hours replace the global ones; otherwise the global ones apply."""
    return campaign if campaign is not None else default


def _wall(instant: datetime, zone: ZoneInfo) -> time:
    return instant.astimezone(zone).time().replace(tzinfo=None)


def _first_instant_at(day: date, wall: time, zone: ZoneInfo, fold: int) -> datetime:
    """The UTC instant the local clock shows `wall` on `day` (fold picks the repeat in an overlap).

    In a DST gap the wall time never shows; the answer is then the transition itself, the first instant the
    clock reads later than `wall`. zoneinfo's fold=0/fold=1 readings of a gap time bracket that transition.
    """
    local = datetime.combine(day, wall, tzinfo=zone).replace(fold=fold)
    instant = local.astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) == local.replace(tzinfo=None):
        return instant
    a = datetime.combine(day, wall, tzinfo=zone).replace(fold=0).astimezone(UTC)
    b = datetime.combine(day, wall, tzinfo=zone).replace(fold=1).astimezone(UTC)
    # From the whole second: transitions fall on whole seconds, and a wall time with a fraction must not
    # carry it past the transition (found by hypothesis: 02:00:00.000001 in a gap ended 1 µs late).
    lo, hi = min(a, b).replace(microsecond=0), max(a, b)
    before = lo.astimezone(zone).utcoffset()
    # Bisect on whole seconds for the first instant with the post-transition offset (gaps are at most a day).
    lo_s, hi_s = 0, math.ceil((hi - lo).total_seconds())
    while lo_s < hi_s:
        mid = (lo_s + hi_s) // 2
        if (lo + timedelta(seconds=mid)).astimezone(zone).utcoffset() == before:
            lo_s = mid + 1
        else:
            hi_s = mid
    return lo + timedelta(seconds=lo_s)


def quiet_until(now: datetime, tz: str, quiet: QuietHours) -> datetime | None:
    """None outside quiet hours; else the UTC instant the window ends (the local clock reaching `end`).

    Walks the candidate ends (today, tomorrow, the day after; both readings of a repeated hour) and takes the
    first one after now that lies outside the window, which covers gaps, overlaps and windows wrapping midnight.
    A fall-back hour can take the clock briefly out of and back into a window; that dip is not its end.
    """
    now = _aware(now).astimezone(UTC)
    zone = _zone(tz)
    if not quiet.contains(_wall(now, zone)):
        return None
    today = now.astimezone(zone).date()
    for offset in range(3):
        day = today + timedelta(days=offset)
        for fold in (0, 1):
            end = _first_instant_at(day, quiet.end, zone, fold)
            if end > now and not quiet.contains(_wall(end, zone)):
                return end
    raise AssertionError(f"no end of quiet hours {quiet} within 3 days of {now} in {tz}")  # pragma: no cover


class Timing(StrEnum):
    send = "send"
    defer = "defer"
    expire = "expire"


def is_urgent(priority: Priority, category: Category) -> bool:
    """Urgent messages ignore quiet hours: anything transactional, and high-priority service messages."""
    return category is Category.transactional or (priority is Priority.high and category is Category.service)


def timing(
    now: datetime,
    triggered_at: datetime,
    tz: str,
    quiet: QuietHours,
    *,
    priority: Priority,
    category: Category,
    max_age: timedelta | None,
) -> tuple[Timing, datetime | None, str]:
    """Send now, defer to the end of quiet hours (the datetime, UTC), or expire as stale; with a reason.

    A deferred message is re-checked with this same function when released, so one that has gone stale
    meanwhile expires then. Staleness applies to urgent messages too: a one-time code past its age is useless.
    """
    now = _aware(now).astimezone(UTC)
    deadline = _aware(triggered_at) + max_age if max_age is not None else None
    if deadline is not None and now > deadline:
        return Timing.expire, None, f"stale: older than its max age {max_age}"
    if is_urgent(priority, category):
        return Timing.send, None, f"urgent ({priority} {category}): quiet hours do not apply"
    until = quiet_until(now, tz, quiet)
    if until is None:
        return Timing.send, None, "outside quiet hours"
    local_end = until.astimezone(_zone(tz))
    if deadline is not None and deadline < until:
        return Timing.expire, None, f"stale: max age {max_age} ends before quiet hours end at {local_end:%H:%M} {tz}"
    return Timing.defer, until, f"quiet hours until {local_end:%Y-%m-%d %H:%M} {tz}"


# --- Frequency caps ----------------------------------------------------------------------------------------------

# Local-day counters outlive the longest local day (25 h) plus the spread of time zones.
CAP_DAY_TTL_S = 2 * 24 * 3600
# Rolling windows keep their entries one hour past the window, so a late check still sees them.
ROLLING_TTL_MARGIN_S = 3600

# Phone makers' own daily limits on marketing ("public"/operational) pushes, per app per device. They differ
# by vendor and by the app's category (e.g. Xiaomi allows 8 to apps with a news licence), and change over
# time: see the Xiaomi push message limits, Huawei Push Kit message classification and vivo push quota
# notices. Service/private-message pushes are not limited this way, so these rules count marketing only.
DEFAULT_VENDOR_LIMITS: dict[str, int] = {"xiaomi": 5, "huawei": 2, "vivo": 5}

Scope = Literal["user", "user_channel", "user_campaign", "user_vendor"]


class CapRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    scope: Scope
    limit: int = Field(ge=0)
    window: Literal["local_day", "rolling"] = "local_day"
    rolling_seconds: int | None = Field(default=None, gt=0)
    # Slots of `limit` only high-priority messages may use.
    reserved_for_high: int = Field(default=0, ge=0)
    # For user_vendor rules: the one vendor it applies to; None applies to every vendor, counted per vendor.
    vendor: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CapRule:
        if (self.window == "rolling") != (self.rolling_seconds is not None):
            raise ValueError("rolling_seconds is required for, and only for, a rolling window")
        if self.reserved_for_high > self.limit:
            raise ValueError("reserved_for_high cannot exceed limit")
        if self.vendor is not None and self.scope != "user_vendor":
            raise ValueError("vendor applies only to scope user_vendor")
        return self

    def effective_limit(self, priority: Priority) -> int:
        """High priority may use every slot; normal all but the reserved ones.

        Low priority is capped first: it stops ceil(10% of limit) earlier than normal (at least one slot
        earlier), but never below 1 while normal messages may still be sent, so a low-priority campaign is
        throttled, not silenced.
        """
        if priority is Priority.high:
            return self.limit
        normal = self.limit - self.reserved_for_high
        if priority is Priority.normal or normal == 0:
            return normal
        return max(1, normal - math.ceil(self.limit / 10))


class CapCheck(BaseModel):
    """One counter the store checks and counts atomically with the message's other checks."""

    model_config = ConfigDict(frozen=True)
    key: str
    limit: int
    rolling_seconds: int | None
    ttl_s: int
    rule: str


def _part(value: str) -> str:
    # Ids may contain ':'; escaping keeps ("a:b", "c") and ("a", "b:c") on different keys.
    return value.replace("%", "%25").replace(":", "%3A")


def cap_checks(
    message_user: str,
    channel: str,
    campaign_id: str,
    vendor: str | None,
    priority: Priority,
    category: Category,
    rules: list[CapRule],
    now: datetime,
    tz: str,
) -> list[CapCheck]:
    """The counters this message must fit under; empty for transactional messages, which are never capped.

    Local-day keys carry the user's local date, so a daily cap resets at the user's midnight. Vendor rules
    apply only to marketing pushes to a device of that vendor (vendor given).
    """
    if category is Category.transactional:
        return []
    day = _aware(now).astimezone(_zone(tz)).strftime("%Y%m%d")
    checks: list[CapCheck] = []
    for rule in rules:
        parts = ["cap", rule.name, _part(message_user)]
        if rule.scope == "user_channel":
            parts.append(_part(channel))
        elif rule.scope == "user_campaign":
            parts.append(_part(campaign_id))
        elif rule.scope == "user_vendor":
            if vendor is None or category is not Category.marketing or rule.vendor not in (None, vendor):
                continue
            if rule.vendor is None:
                parts.append(_part(vendor))
        if rule.window == "local_day":
            parts.append(day)
            ttl_s = CAP_DAY_TTL_S
        else:
            assert rule.rolling_seconds is not None
            ttl_s = rule.rolling_seconds + ROLLING_TTL_MARGIN_S
        checks.append(
            CapCheck(
                key=":".join(parts),
                limit=rule.effective_limit(priority),
                rolling_seconds=rule.rolling_seconds,
                ttl_s=ttl_s,
                rule=rule.name,
            )
        )
    return checks


def default_rules(daily_cap: int) -> list[CapRule]:
    """The global daily cap per user, plus each phone maker's daily marketing-push limit."""
    rules = [CapRule(name="user_daily", scope="user", limit=daily_cap)]
    rules += [
        CapRule(name=f"vendor_push_daily:{vendor}", scope="user_vendor", limit=limit, vendor=vendor)
        for vendor, limit in DEFAULT_VENDOR_LIMITS.items()
    ]
    return rules


# --- Dedup -------------------------------------------------------------------------------------------------------

# Longer than any redelivery window (Kafka retention, consumer-group rebalances, replays after an outage).
DEDUP_TTL_S = 7 * 24 * 3600


def dedup_key(message_id: str) -> str:
    """The key recording that a message got its final verdict here.

    Message ids are deterministic (streams.match.message_id hashes campaign, user, event and channel), so a
    redelivered or replayed event yields the same id and finds this key. A deferral records nothing, so a
    released message passes dedup and gets its verdict then.
    """
    return f"dedup:{message_id}"


# --- The chain ---------------------------------------------------------------------------------------------------

DECIDE_CHAIN: list[tuple[str, str]] = [
    ("dedup", "first and cheapest: a redelivered message must not be judged or counted a second time"),
    ("stock", "a message quoting a product's stock never goes once it sold out: expired, not deferred or counted"),
    ("preferences", "consent before anything else: an opted-out user is neither deferred nor counted"),
    ("quiet_hours", "before caps: a deferred message must not spend today's slot; it is counted when released"),
    ("caps", "last, because it spends a slot: only messages that will go out now are counted"),
]


def decide_order() -> list[str]:
    """The throttle stage's checks in the order it runs them (rationale per step in DECIDE_CHAIN)."""
    return [step for step, _ in DECIDE_CHAIN]
