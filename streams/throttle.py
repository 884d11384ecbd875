"""Throttle: the delivery policy, as one declared chain (streams.policy.DECIDE_CHAIN) — never twice,
never against the user's wishes, not in their quiet hours, never too often — then priority picks
the dispatch topic. Every decision that stops a message ends in an outcome with its reason.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from functools import lru_cache

from connectors.channels.base import adapter_class
from connectors.policy_store import AdmitRequest
from infra import topics
from schemas.config import Campaign, Channel
from schemas.contracts import encode
from schemas.models import Outcome, OutcomeCode, Priority, RenderedMessage, now_utc
from streams.inventory import sold_out, sold_out_reason
from streams.policy import (
    DEDUP_TTL_S,
    CapRule,
    Category,
    Preferences,
    QuietHours,
    Timing,
    cap_checks,
    dedup_key,
    default_rules,
    effective_quiet,
    preference_verdict,
    resolve_timezone,
    timing,
)


def parse_quiet_hours(text: str) -> QuietHours:
    """The global setting: "22:00-08:00", or "off"."""
    if text.strip().lower() in ("off", "none", ""):
        return QuietHours(enabled=False)
    start, _, end = text.partition("-")
    return QuietHours(start=time.fromisoformat(start.strip()), end=time.fromisoformat(end.strip()))


@lru_cache(maxsize=256)
def _vendor_of(provider: str) -> str | None:
    try:
        return adapter_class(provider).push_vendor
    except LookupError:
        return None


def push_vendor(channel: Channel | None) -> str | None:
    """The phone maker whose push service the channel's provider is, if any (its daily limits apply)."""
    return None if channel is None else _vendor_of(channel.provider)


def dispatch_topic(message: RenderedMessage) -> str:
    return topics.DISPATCH[message.priority.value].name


@lru_cache(maxsize=64)
def _default_rules(daily_cap: int) -> tuple[CapRule, ...]:
    # The same few rules for every message: built once per cap value, not per message.
    return tuple(default_rules(daily_cap))


def rules_for(campaign: Campaign | None, daily_cap: int) -> list[CapRule]:
    cap = campaign.daily_cap if campaign and campaign.daily_cap is not None else daily_cap
    return [*_default_rules(cap), *(campaign.caps if campaign else [])]


NO_PREFERENCES = Preferences()


def preferences_of(stored: dict | None) -> Preferences:
    return Preferences.model_validate(stored) if stored else NO_PREFERENCES


def millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def judge(
    message: RenderedMessage,
    campaign: Campaign | None,
    prefs: Preferences,
    *,
    now: datetime,
    global_quiet: QuietHours,
    default_timezone: str,
    daily_cap: int,
    vendor: str | None = None,
) -> Outcome | tuple[datetime, Outcome] | AdmitRequest:
    """Preferences and quiet hours (pure); a message that passes becomes a request for the atomic
    dedup-and-caps check. A deferral comes back as (release time, deferred outcome)."""
    category = campaign.category if campaign else Category.marketing
    reason = preference_verdict(prefs, message.channel, category)
    if reason:
        return Outcome.of(message, OutcomeCode.opted_out, "throttle", reason)
    tz = resolve_timezone(prefs.timezone, default_timezone)
    quiet = effective_quiet(campaign.quiet_hours if campaign else None, global_quiet)
    max_age = timedelta(minutes=campaign.max_age_minutes) if campaign and campaign.max_age_minutes else None
    when, until, why = timing(
        now, message.triggered_at, tz, quiet, priority=message.priority, category=category, max_age=max_age
    )
    if when is Timing.expire:
        return Outcome.of(message, OutcomeCode.expired, "throttle", why)
    if when is Timing.defer:
        return until, Outcome.of(message, OutcomeCode.deferred, "throttle", why)
    checks = cap_checks(
        message.user_id, message.channel, message.campaign_id, vendor, message.priority, category,
        rules_for(campaign, daily_cap), now, tz,
    )  # fmt: skip
    return AdmitRequest(
        message_id=message.message_id,
        dedup_key=dedup_key(message.message_id),
        dedup_ttl_s=DEDUP_TTL_S,
        checks=[(c.key, c.limit, c.rolling_seconds, c.ttl_s, c.rule) for c in checks],
        now_ms=millis(now),
    )


async def sold_out_messages(rt, messages: list[RenderedMessage]) -> set[str]:
    """Ids of the messages whose product sold out before they could go (nothing to do, and no round
    trip, for messages that quote no stock). One MGET reads the stock and the dedup claims: a message
    already judged and sent stays deduplicated rather than gaining a second verdict; a sold-out one
    is claimed, so a later restock and fall past the same threshold does not send it after all."""
    quoting = [m for m in messages if m.inventory_product]
    if not quoting:
        return set()
    keys = [dedup_key(m.message_id) for m in quoting]
    stocks, judged = await rt.user_state.inventory.stocks_and_claims([m.inventory_product for m in quoting], keys)
    gone = [
        (key, m.message_id)
        for m, key, seen in zip(quoting, keys, judged, strict=True)
        if not seen and sold_out(stocks[m.inventory_product])
    ]
    await rt.user_state.inventory.claim([k for k, _ in gone], [i for _, i in gone], DEDUP_TTL_S)
    return {i for _, i in gone}


async def handle(rt, out, messages: list[RenderedMessage]) -> None:
    if any(m.priority is Priority.high for m in messages):
        rt.gate.note_urgent()
    now = now_utc()
    stored = await rt.policy.preferences([m.user_id for m in messages])
    gone = await sold_out_messages(rt, messages)
    deferrals: list[tuple[int, bytes]] = []
    admitting: list[tuple[RenderedMessage, AdmitRequest]] = []
    for message, prefs in zip(messages, stored, strict=True):
        if message.message_id in gone:
            reason = sold_out_reason(message.inventory_product)
            out.outcome(Outcome.of(message, OutcomeCode.expired, "throttle", reason))
            continue
        verdict = judge(
            message,
            rt.config.campaign(message.campaign_id),
            preferences_of(prefs),
            now=now,
            global_quiet=rt.quiet_hours,
            default_timezone=rt.settings.default_timezone,
            daily_cap=rt.settings.daily_cap,
            vendor=push_vendor(rt.config.channel(message.channel)),
        )
        if isinstance(verdict, Outcome):
            out.outcome(verdict)
        elif isinstance(verdict, tuple):
            until, deferred = verdict
            deferrals.append((millis(until), encode(message)))
            out.outcome(deferred)
        else:
            admitting.append((message, verdict))
    # Deferred before anything is counted: a released message is judged, and counted, when it goes.
    await rt.policy.defer(deferrals)
    admissions = await rt.policy.admit([request for _, request in admitting])
    for (message, _), admission in zip(admitting, admissions, strict=True):
        if admission.status == "admitted":
            out.send(dispatch_topic(message), message.user_id, message)
        elif admission.status == "duplicate":
            out.outcome(Outcome.of(message, OutcomeCode.deduplicated, "throttle", "already judged and sent"))
        else:
            out.outcome(Outcome.of(message, OutcomeCode.capped, "throttle", f"cap {admission.rule} reached"))
