"""Throttle: a per-user daily cap, then priority decides the dispatch topic.

The cap is counted in Redis by message id (a set per user and day), so a redelivered message
gets the same answer it got the first time instead of spending a second slot.
"""

from __future__ import annotations

from datetime import datetime

from infra import topics
from schemas.config import Campaign
from schemas.models import Outcome, OutcomeCode, RenderedMessage, now_utc

CAP_TTL_S = 2 * 24 * 3600


def cap_key(user_id: str, day: datetime) -> str:
    return f"cap:day:{user_id}:{day:%Y%m%d}"


def cap_limit(campaign: Campaign | None, default: int) -> int:
    return campaign.daily_cap if campaign and campaign.daily_cap is not None else default


def dispatch_topic(message: RenderedMessage) -> str:
    return topics.DISPATCH[message.priority.value].name


def capped(message: RenderedMessage, limit: int) -> Outcome:
    return Outcome.of(message, OutcomeCode.capped, "throttle", f"daily cap {limit} per user reached")


async def handle(rt, out, messages: list[RenderedMessage]) -> None:
    today = now_utc()
    limits = [cap_limit(rt.config.campaign(m.campaign_id), rt.settings.daily_cap) for m in messages]
    allowed = await rt.user_state.claim_caps(
        [(cap_key(m.user_id, today), m.message_id, limit) for m, limit in zip(messages, limits, strict=True)],
        CAP_TTL_S,
    )
    for message, ok, limit in zip(messages, allowed, limits, strict=True):
        if ok:
            out.send(dispatch_topic(message), message.user_id, message)
        else:
            out.outcome(capped(message, limit))
