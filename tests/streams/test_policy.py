from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas.models import Priority
from streams.match import message_id
from streams.policy import (
    CAP_DAY_TTL_S,
    DECIDE_CHAIN,
    DEDUP_TTL_S,
    CapRule,
    Category,
    Preferences,
    QuietHours,
    Timing,
    apply_unsubscribe,
    cap_checks,
    decide_order,
    dedup_key,
    default_rules,
    effective_quiet,
    preference_verdict,
    quiet_until,
    resolve_timezone,
    timing,
    unsubscribe_keyword,
)

pytestmark = pytest.mark.unit

M, S, T = Category.marketing, Category.service, Category.transactional


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# (preferences, channel, category, allowed)
PREFERENCES = [
    (Preferences(), "sms", M, True),
    (Preferences(opted_out=True), "sms", M, False),
    (Preferences(opted_out=True), "sms", S, False),
    (Preferences(opted_out=True), "sms", T, True),
    (Preferences(blocked_categories={M}), "push", M, False),
    (Preferences(blocked_categories={M}), "push", S, True),
    (Preferences(blocked_categories={M}), "push", T, True),
    (Preferences(blocked_channels={"sms"}), "sms", T, False),
    (Preferences(blocked_channels={"sms"}), "push", T, True),
    (Preferences(blocked_channels={"sms"}, opted_out=True), "email", T, True),
]


@pytest.mark.parametrize(("prefs", "channel", "category", "allowed"), PREFERENCES)
def test_preference_verdict(prefs, channel, category, allowed) -> None:
    verdict = preference_verdict(prefs, channel, category)
    assert (verdict is None) == allowed
    assert verdict is None or verdict.startswith("user ")


# (reply, unsubscribes)
KEYWORDS = [
    ("TD", True),
    ("td", True),
    (" T ", True),
    ("t.", True),
    ("退订", True),
    ("退订。", True),
    ("ＴＤ", True),
    ("STOP", True),
    ("Stop!", True),
    ("stop all", True),
    ("STOPALL", True),
    ("Un-subscribe", True),
    ("cancel", True),
    ("End", True),
    ("QUIT\n", True),
    ("stop by later", False),
    ("please stop", False),
    ("T-shirt", False),
    ("不退订", False),
    ("thanks", False),
    ("", False),
    ("?!", False),
]


@pytest.mark.parametrize(("reply", "unsubscribes"), KEYWORDS)
def test_unsubscribe_keyword(reply, unsubscribes) -> None:
    assert unsubscribe_keyword(reply) is unsubscribes


# (channel, category, expected opted_out, blocked channels, blocked categories)
UNSUBSCRIBES = [
    (None, None, True, set(), set()),
    ("sms", None, False, {"sms"}, set()),
    (None, M, False, set(), {M}),
    ("sms", M, False, {"sms"}, {M}),
    (None, T, True, set(), set()),
]


@pytest.mark.parametrize(("channel", "category", "opted_out", "channels", "categories"), UNSUBSCRIBES)
def test_apply_unsubscribe(channel, category, opted_out, channels, categories) -> None:
    before = Preferences(preferred_channel="push")
    after = apply_unsubscribe(before, channel=channel, category=category)
    assert (after.opted_out, after.blocked_channels, after.blocked_categories) == (opted_out, channels, categories)
    assert after.preferred_channel == "push" and before == Preferences(preferred_channel="push")


def test_preferences_round_trip_as_json_and_ignore_unknown_keys() -> None:
    prefs = Preferences(blocked_categories={M}, blocked_channels={"sms"}, timezone="Asia/Shanghai")
    assert Preferences.model_validate_json(prefs.model_dump_json()) == prefs
    assert Preferences.model_validate_json('{"opted_out": true, "later": 1}').opted_out


@pytest.mark.parametrize(
    ("name", "expected"), [("Europe/Berlin", "Europe/Berlin"), ("Mars/Base", "UTC"), (None, "UTC"), ("", "UTC")]
)
def test_resolve_timezone(name, expected) -> None:
    assert resolve_timezone(name, "UTC") == expected


NIGHT = QuietHours()
EARLY = QuietHours(start=time(1), end=time(2, 30))  # ends inside New York's spring-forward gap
SHORT = QuietHours(start=time(0), end=time(1, 30))  # ends inside New York's repeated fall-back hour
LUNCH = QuietHours(start=time(13), end=time(14))

# (now, tz, quiet, expected end or None); 2026 DST: New York Mar 8 / Nov 1, Berlin Mar 29 / Oct 25.
QUIET = [
    (utc(2026, 11, 24, 15), "Asia/Shanghai", NIGHT, utc(2026, 11, 25, 0)),  # 23:00 local
    (utc(2026, 11, 24, 22, 30), "Asia/Shanghai", NIGHT, utc(2026, 11, 25, 0)),  # 06:30 local, next day
    (utc(2026, 11, 24, 1), "Asia/Shanghai", NIGHT, None),  # 09:00 local
    (utc(2026, 11, 24, 13, 59), "Asia/Shanghai", NIGHT, None),  # 21:59 local
    (utc(2026, 11, 24, 14), "Asia/Shanghai", NIGHT, utc(2026, 11, 25, 0)),  # 22:00 local: start is inclusive
    (utc(2026, 11, 25, 0), "Asia/Shanghai", NIGHT, None),  # 08:00 local: end is exclusive
    (utc(2026, 11, 24, 15), "Asia/Shanghai", QuietHours(enabled=False), None),
    (utc(2026, 11, 24, 15), "Asia/Shanghai", QuietHours(start=time(8), end=time(8)), None),
    (utc(2026, 11, 24, 5, 30), "Asia/Shanghai", LUNCH, utc(2026, 11, 24, 6)),
    (utc(2026, 11, 24, 15), "Asia/Shanghai", LUNCH, None),
    (utc(2026, 3, 8, 3), "America/New_York", NIGHT, utc(2026, 3, 8, 12)),  # 22:00 EST → 08:00 EDT
    (utc(2026, 3, 8, 6, 30), "America/New_York", EARLY, utc(2026, 3, 8, 7)),  # 02:30 never shows: 03:00 EDT
    (utc(2026, 11, 1, 2, 30), "America/New_York", NIGHT, utc(2026, 11, 1, 13)),  # 22:30 EDT → 08:00 EST
    (utc(2026, 11, 1, 5, 10), "America/New_York", SHORT, utc(2026, 11, 1, 5, 30)),  # 01:10 EDT → first 01:30
    (utc(2026, 11, 1, 6, 10), "America/New_York", SHORT, utc(2026, 11, 1, 6, 30)),  # 01:10 EST → second 01:30
    (utc(2026, 7, 1, 19, 59), "Europe/Berlin", NIGHT, None),  # 21:59 CEST
    (utc(2026, 7, 1, 20), "Europe/Berlin", NIGHT, utc(2026, 7, 2, 6)),
    (utc(2026, 3, 28, 21, 30), "Europe/Berlin", NIGHT, utc(2026, 3, 29, 6)),  # 22:30 CET → 08:00 CEST
    (utc(2026, 10, 24, 20, 30), "Europe/Berlin", NIGHT, utc(2026, 10, 25, 7)),  # 22:30 CEST → 08:00 CET
]


@pytest.mark.parametrize(("now", "tz", "quiet", "expected"), QUIET)
def test_quiet_until(now, tz, quiet, expected) -> None:
    assert quiet_until(now, tz, quiet) == expected


def test_campaign_quiet_hours_replace_the_global_ones() -> None:
    assert (effective_quiet(LUNCH, NIGHT), effective_quiet(None, NIGHT)) == (LUNCH, NIGHT)


IN_QUIET = utc(2026, 11, 24, 15)  # 23:00 in Shanghai
QUIET_END = utc(2026, 11, 25, 0)

# (now, triggered_at, priority, category, max_age, timing, until)
TIMINGS = [
    (IN_QUIET, IN_QUIET, Priority.normal, M, None, Timing.defer, QUIET_END),
    (IN_QUIET, IN_QUIET, Priority.high, M, None, Timing.defer, QUIET_END),
    (IN_QUIET, IN_QUIET, Priority.normal, M, timedelta(hours=12), Timing.defer, QUIET_END),
    (IN_QUIET, IN_QUIET, Priority.normal, M, timedelta(hours=1), Timing.expire, None),
    (IN_QUIET, IN_QUIET, Priority.low, T, None, Timing.send, None),
    (IN_QUIET, IN_QUIET, Priority.high, S, None, Timing.send, None),
    (IN_QUIET, IN_QUIET, Priority.normal, S, None, Timing.defer, QUIET_END),
    (utc(2026, 11, 24, 3), utc(2026, 11, 24, 3), Priority.low, M, None, Timing.send, None),
    # Released at the end of the window: sent if still fresh, expired if it went stale while deferred.
    (QUIET_END, IN_QUIET, Priority.normal, M, timedelta(hours=1, minutes=30), Timing.expire, None),
    (QUIET_END, IN_QUIET, Priority.normal, M, timedelta(hours=12), Timing.send, None),
    # A one-time code past its age is useless even though urgent.
    (IN_QUIET, IN_QUIET - timedelta(minutes=10), Priority.high, T, timedelta(minutes=5), Timing.expire, None),
]


@pytest.mark.parametrize(("now", "triggered", "priority", "category", "max_age", "expected", "until"), TIMINGS)
def test_timing(now, triggered, priority, category, max_age, expected, until) -> None:
    verdict, when, reason = timing(
        now, triggered, "Asia/Shanghai", NIGHT, priority=priority, category=category, max_age=max_age
    )
    assert (verdict, when) == (expected, until)
    assert reason and (verdict is not Timing.expire or reason.startswith("stale"))


def test_deferred_then_released_is_sent() -> None:
    late = utc(2026, 11, 24, 22)  # 23:00 in Berlin
    verdict, until, _ = timing(late, late, "Europe/Berlin", NIGHT, priority=Priority.normal, category=M, max_age=None)
    assert (verdict, until) == (Timing.defer, utc(2026, 11, 25, 7))
    again = timing(until, late, "Europe/Berlin", NIGHT, priority=Priority.normal, category=M, max_age=None)
    assert again[0] is Timing.send


ZONES = ["Asia/Shanghai", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Pacific/Apia", "UTC"]


@settings(max_examples=300, deadline=None)
@given(
    now=st.datetimes(min_value=datetime(2011, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)),
    tz=st.sampled_from(ZONES),
    start=st.times(),
    end=st.times(),
)
# The window ends inside a spring-forward gap at a wall time with a fraction of a second.
@example(datetime(2024, 3, 9, 8, 0, 1, tzinfo=UTC), "America/New_York", time(3, 0, 1), time(2, 0, 0, 1))
def test_quiet_until_is_after_now_and_outside_the_window(now, tz, start, end) -> None:
    quiet = QuietHours(start=start, end=end)
    until = quiet_until(now, tz, quiet)
    zone = ZoneInfo(tz)
    assert (until is None) == (not quiet.contains(now.astimezone(zone).time()))
    if until is not None:
        assert until > now
        assert not quiet.contains(until.astimezone(zone).time())
        # The window's end, not some later moment: just before it the clock is still in the window.
        assert quiet.contains((until - timedelta(microseconds=1)).astimezone(zone).time())


AT = utc(2026, 11, 24, 20)  # 04:00 Nov 25 in Shanghai, 15:00 Nov 24 in New York, 21:00 Nov 24 in Berlin

# (tz, local day in the key)
LOCAL_DAYS = [("Asia/Shanghai", "20261125"), ("America/New_York", "20261124"), ("Europe/Berlin", "20261124")]


@pytest.mark.parametrize(("tz", "day"), LOCAL_DAYS)
def test_cap_keys_use_the_users_local_day(tz, day) -> None:
    [check] = cap_checks("u1", "sms", "c1", None, Priority.normal, M, default_rules(5), AT, tz)
    assert (check.key, check.limit, check.ttl_s, check.rule) == (
        f"cap:user_daily:u1:{day}",
        5,
        CAP_DAY_TTL_S,
        "user_daily",
    )


RESERVED = CapRule(name="user_daily", scope="user", limit=5, reserved_for_high=1)

# (rule, priority, effective limit)
LIMITS = [
    (RESERVED, Priority.high, 5),
    (RESERVED, Priority.normal, 4),
    (RESERVED, Priority.low, 3),
    (CapRule(name="d", scope="user", limit=5), Priority.low, 4),
    (CapRule(name="d", scope="user", limit=20, reserved_for_high=2), Priority.normal, 18),
    (CapRule(name="d", scope="user", limit=20, reserved_for_high=2), Priority.low, 16),
    (CapRule(name="d", scope="user", limit=2), Priority.low, 1),
    (CapRule(name="d", scope="user", limit=1), Priority.low, 1),
    (CapRule(name="d", scope="user", limit=0), Priority.low, 0),
    (CapRule(name="d", scope="user", limit=1, reserved_for_high=1), Priority.low, 0),
]


@pytest.mark.parametrize(("rule", "priority", "limit"), LIMITS)
def test_effective_limits(rule, priority, limit) -> None:
    [check] = cap_checks("u", "sms", "c", None, priority, M, [rule], AT, "UTC")
    assert check.limit == limit


# (vendor, category, rules applied)
VENDORS = [
    (None, M, ["user_daily"]),
    ("xiaomi", M, ["user_daily", "vendor_push_daily:xiaomi"]),
    ("huawei", M, ["user_daily", "vendor_push_daily:huawei"]),
    ("apple", M, ["user_daily"]),
    ("xiaomi", S, ["user_daily"]),
    ("xiaomi", T, []),
    (None, T, []),
]


@pytest.mark.parametrize(("vendor", "category", "applied"), VENDORS)
def test_vendor_rules_apply_only_to_marketing_on_that_vendor(vendor, category, applied) -> None:
    checks = cap_checks("u1", "push", "c1", vendor, Priority.high, category, default_rules(5), AT, "UTC")
    assert [c.rule for c in checks] == applied
    assert all(c.key.startswith(f"cap:{c.rule}:u1:") for c in checks)


SCOPED = [
    CapRule(name="channel_daily", scope="user_channel", limit=3),
    CapRule(name="campaign_user", scope="user_campaign", limit=1),
    CapRule(name="rolling_7d", scope="user", limit=3, window="rolling", rolling_seconds=7 * 86400),
    CapRule(name="vendor_any", scope="user_vendor", limit=4),
]

# (rule name, key, rolling_seconds, ttl)
SCOPED_KEYS = [
    ("channel_daily", "cap:channel_daily:a%3Ab:sms:20261124", None, CAP_DAY_TTL_S),
    ("campaign_user", "cap:campaign_user:a%3Ab:spring%3Asale:20261124", None, CAP_DAY_TTL_S),
    ("rolling_7d", "cap:rolling_7d:a%3Ab", 7 * 86400, 7 * 86400 + 3600),
    ("vendor_any", "cap:vendor_any:a%3Ab:oppo:20261124", None, CAP_DAY_TTL_S),
]


@pytest.mark.parametrize(("rule", "key", "rolling", "ttl"), SCOPED_KEYS)
def test_scoped_keys(rule, key, rolling, ttl) -> None:
    checks = {c.rule: c for c in cap_checks("a:b", "sms", "spring:sale", "oppo", Priority.normal, M, SCOPED, AT, "UTC")}
    assert (checks[rule].key, checks[rule].rolling_seconds, checks[rule].ttl_s) == (key, rolling, ttl)


@pytest.mark.parametrize(
    "fields",
    [
        {"window": "rolling"},
        {"rolling_seconds": 60},
        {"reserved_for_high": 6},
        {"vendor": "xiaomi"},
        {"limit": -1},
    ],
)
def test_inconsistent_rules_are_refused(fields) -> None:
    with pytest.raises(ValueError):
        CapRule(**{"name": "r", "scope": "user", "limit": 5} | fields)


def test_dedup_key_is_stable_for_a_redelivered_message() -> None:
    first, again = (message_id("c1", "u1", "e1", "sms") for _ in range(2))
    assert dedup_key(first) == dedup_key(again) == f"dedup:{first}"
    assert DEDUP_TTL_S == 7 * 24 * 3600


def test_decide_order() -> None:
    assert decide_order() == ["dedup", "stock", "preferences", "quiet_hours", "caps"]
    assert all(reason for _, reason in DECIDE_CHAIN)
