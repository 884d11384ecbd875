"""Match: which active campaigns does a trigger event start, and for whom — and which earlier
messages does it convert. One matched message per (campaign, user, event, channel)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from pydantic import BaseModel

from infra import topics
from schemas.config import Campaign
from schemas.models import Event, MatchedMessage, Outcome, OutcomeCode, Priority, now_utc


def message_id(campaign_id: str, user_id: str, event_id: str, channel: str) -> str:
    """Deterministic, so a redelivered event yields the same message, never a second one."""
    digest = hashlib.blake2b(f"{campaign_id}\x1f{user_id}\x1f{event_id}\x1f{channel}".encode(), digest_size=16)
    return digest.hexdigest()


def in_audience(campaign: Campaign, user_id: str) -> bool:
    return campaign.audience.kind == "all" or user_id in campaign.audience.user_ids


def match_event(event: Event, campaigns: list[Campaign]) -> list[MatchedMessage]:
    return [
        MatchedMessage(
            message_id=message_id(c.id, event.user_id, event.event_id, c.channel),
            campaign_id=c.id,
            user_id=event.user_id,
            event_id=event.event_id,
            event_type=event.event_type,
            channel=c.channel,
            priority=c.priority,
            triggered_at=event.occurred_at,
            properties=event.properties,
        )
        for c in campaigns
        if c.trigger.event_type == event.event_type and in_audience(c, event.user_id)
    ]


def fallback_message(message: MatchedMessage, campaign: Campaign) -> MatchedMessage | None:
    """The same trigger on the campaign's next channel, or None after the last. Its id is
    deterministic like any message's, so however many times the fallback fires, one message results."""
    following = campaign.next_channel(message.channel)
    if following is None:
        return None
    return message.model_copy(
        update={
            "channel": following,
            "message_id": message_id(campaign.id, message.user_id, message.event_id, following),
            "fallback_of": message.fallback_of or message.message_id,
        }
    )


class Touch(BaseModel):
    """The last message a campaign sent to a user: what a later conversion is credited to."""

    message_id: str
    campaign_id: str
    channel: str
    triggered_at: datetime
    sent_at: datetime


def attribute_conversion(event: Event, campaigns: list[Campaign], touches: dict[str, Touch]) -> list[Outcome]:
    """Last touch per campaign, inside the campaign's attribution window, after the send."""
    outcomes = []
    for campaign in campaigns:
        touch = touches.get(campaign.id)
        if touch is None or campaign.conversion_event != event.event_type:
            continue
        if not touch.sent_at <= event.occurred_at <= touch.sent_at + timedelta(hours=campaign.attribution_window_hours):
            continue
        outcomes.append(
            Outcome(
                message_id=touch.message_id,
                campaign_id=campaign.id,
                user_id=event.user_id,
                channel=touch.channel,
                code=OutcomeCode.converted,
                stage="match",
                reason=f"{event.event_type} {event.event_id}",
                triggered_at=touch.triggered_at,
                occurred_at=now_utc(),
            )
        )
    return outcomes


async def handle(rt, out, events: list[Event]) -> None:
    """Agent glue: conversions first (they read touches from Redis), then new messages."""
    converting = [e for e in events if e.event_type in rt.config.by_conversion]
    if converting:
        for event, touches in zip(
            converting, await rt.user_state.touches([e.user_id for e in converting]), strict=True
        ):
            for outcome in attribute_conversion(event, rt.config.by_conversion[event.event_type], touches):
                out.outcome(outcome)
    for event in events:
        for message in match_event(event, rt.config.by_trigger.get(event.event_type, [])):
            if message.priority is Priority.high:
                rt.gate.note_urgent()
            out.send(topics.MATCHED.name, message.user_id, message)
