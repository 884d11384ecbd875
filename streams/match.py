"""Match: which active campaigns does a trigger event start, and for whom — and which earlier
messages does it convert. One matched message per (campaign, user, event, channel)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from datetime import datetime, timedelta

from pydantic import BaseModel

from connectors.kafka import send_keyed
from infra import topics
from schemas.config import Campaign
from schemas.contracts import encode
from schemas.models import Event, MatchedMessage, Outcome, OutcomeCode, Priority, now_utc
from streams.inventory import StockChange, crossed, inventory_change, threshold_event_id
from streams.segments import evaluate, max_window, referenced_packages
from streams.tags import tag_effects


def message_id(campaign_id: str, user_id: str, event_id: str, channel: str) -> str:
    """Deterministic, so a redelivered event yields the same message, never a second one."""
    digest = hashlib.blake2b(f"{campaign_id}\x1f{user_id}\x1f{event_id}\x1f{channel}".encode(), digest_size=16)
    return digest.hexdigest()


def in_audience(campaign: Campaign, user_id: str, members: Mapping[tuple[str, str], bool] | None = None) -> bool:
    """`members` holds the segment verdicts judged for this batch: (segment id, user id) → member."""
    audience = campaign.audience
    if audience.kind == "segment":
        return bool((members or {}).get((audience.segment_id, user_id)))
    return audience.kind == "all" or user_id in audience.user_ids


def matched(campaign: Campaign, user_id: str, event: Event, event_id: str, properties: dict) -> MatchedMessage:
    """The campaign's message to one user, started by `event_id` (the event's own, or one it stands for)."""
    return MatchedMessage(
        message_id=message_id(campaign.id, user_id, event_id, campaign.channel),
        campaign_id=campaign.id,
        user_id=user_id,
        event_id=event_id,
        event_type=event.event_type,
        channel=campaign.channel,
        priority=campaign.priority,
        triggered_at=event.occurred_at,
        properties=properties,
    )


def match_event(
    event: Event, campaigns: list[Campaign], members: Mapping[tuple[str, str], bool] | None = None
) -> list[MatchedMessage]:
    return [
        matched(c, event.user_id, event, event.event_id, event.properties)
        for c in campaigns
        # An inventory campaign messages the product's carters (threshold_messages), never the event's user.
        if c.trigger.event_type == event.event_type
        and c.trigger.inventory is None
        and in_audience(c, event.user_id, members)
    ]


def threshold_messages(
    campaign: Campaign,
    event: Event,
    product_id: str,
    threshold: int,
    carters: list[str],
    members: Mapping[tuple[str, str], bool] | None = None,
) -> list[MatchedMessage]:
    """One message per carter in the campaign's audience, its trigger the (product, threshold) rather
    than the stock event: the same id however often the stock crosses that threshold."""
    event_id = threshold_event_id(product_id, threshold)
    properties = {**event.properties, "product_id": product_id, "threshold": threshold}
    return [
        matched(campaign, user_id, event, event_id, properties)
        for user_id in carters
        if in_audience(campaign, user_id, members)
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
    # A channel fallback waits on this message's fate: its receipt must settle it (one lookup saved
    # per receipt of every other message).
    fallback: bool = False
    # The message this one stands in for (a channel fallback's lineage), so its receipts keep it too.
    fallback_of: str | None = None


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


async def observe(rt, out, events: list[Event]) -> None:
    """Behaviour before matching: tag rules change tags, and the history live segments count is
    recorded, so the event that earns a tag or completes a pattern already counts."""
    config = rt.config
    relevant = [e for e in events if e.event_type in config.tag_rules or e.event_type in config.event_windows]
    if not relevant:
        return
    effects = [tag_effects(e, config.tag_rules.get(e.event_type, [])) for e in relevant]
    for change in await rt.profiles.observe(relevant, effects, config.event_windows):
        out.send(topics.TAG_CHANGES.name, change.user_id, change)


async def segment_verdicts(rt, events: list[Event]) -> dict[tuple[str, str], bool]:
    """(segment, user) → member, for the segment audiences of the campaigns these events trigger,
    judged on each user's live profile (one Redis round trip for the batch)."""
    wanted: dict[str, set[str]] = {}
    for event in events:
        for campaign in rt.config.by_trigger.get(event.event_type, []):
            if campaign.audience.kind == "segment" and campaign.trigger.inventory is None:
                wanted.setdefault(event.user_id, set()).add(campaign.audience.segment_id)
    return await verdicts_for(rt, wanted)


async def verdicts_for(rt, wanted: Mapping[str, set[str]]) -> dict[tuple[str, str], bool]:
    """(segment, user) → member for the segments wanted per user (user → segment ids)."""
    if not wanted:
        return {}
    segments = {sid: rt.config.segment(sid) for sids in wanted.values() for sid in sids}
    live = {sid: doc for sid, doc in segments.items() if doc is not None and doc.status == "active"}
    lookback = max((max_window(doc.root) for doc in live.values()), default=timedelta(0))
    users = sorted(wanted)
    now = now_utc()
    facts = dict(zip(users, await rt.profiles.facts(users, lookback, now), strict=True))
    packages = {p for doc in live.values() for p in referenced_packages(doc.root)}
    inside: set[tuple[str, str]] = set()
    for package_id in packages:
        flags = await rt.audience.in_package(package_id, users)
        inside.update((package_id, u) for u, flag in zip(users, flags, strict=True) if flag)
    verdicts = {}
    for user_id, sids in wanted.items():
        for sid in sids:
            doc = live.get(sid)  # a missing or paused segment has no members
            verdicts[(sid, user_id)] = doc is not None and evaluate(
                doc.root, facts[user_id], now, lambda package_id, uid: (package_id, uid) in inside
            )
    return verdicts


def in_order(events: list[Event], config) -> list[list[Event]]:
    """The batch cut so that within each piece every change to a user's profile comes before the
    segment judgements of that user: a trigger never sees a tag its user earns later in the batch."""
    pieces: list[list[Event]] = [[]]
    judged: set[str] = set()
    for event in events:
        if event.user_id in judged and (
            event.event_type in config.tag_rules or event.event_type in config.event_windows
        ):
            pieces.append([])
            judged = set()
        pieces[-1].append(event)
        if any(c.audience.kind == "segment" for c in config.by_trigger.get(event.event_type, ())):
            judged.add(event.user_id)
    return pieces


async def peak(rt, events: list[Event]) -> None:
    """The peak phase: cart events keep who carted what, stock events set the live stock (one
    round trip for the batch), and a stock change that crosses a campaign's threshold downwards
    fans out to the product's carters. Carters are read and produced a bounded chunk at a time,
    each chunk acknowledged by Kafka before the next: a retried batch re-sends some messages, with
    the same ids, which the throttle ends deduplicated."""
    changed = [(e, c) for e in events if (c := inventory_change(e)) is not None]
    if not changed:
        return
    previous = await rt.user_state.inventory.observe([c for _, c in changed])
    stock_changes = [(e, c) for e, c in changed if isinstance(c, StockChange)]
    for (event, change), before in zip(stock_changes, previous, strict=True):
        for campaign in rt.config.by_trigger.get(event.event_type, []):
            if campaign.trigger.inventory is None:
                continue
            threshold = crossed(before, change.stock, campaign.trigger.inventory.thresholds)
            if threshold is None:
                continue
            if campaign.priority is Priority.high:
                rt.gate.note_urgent()
            async for carters in rt.user_state.inventory.carters(change.product_id):
                members = {}
                if campaign.audience.kind == "segment":
                    members = await verdicts_for(rt, {u: {campaign.audience.segment_id} for u in carters})
                messages = threshold_messages(campaign, event, change.product_id, threshold, carters, members)
                records = [(m.user_id.encode(), encode(m)) for m in messages]
                await asyncio.gather(*await send_keyed(rt.producer, topics.MATCHED.name, records))


async def handle(rt, out, events: list[Event]) -> None:
    """Agent glue: conversions first (they read touches from Redis), then behaviour, then new messages."""
    converting = [e for e in events if e.event_type in rt.config.by_conversion]
    if converting:
        for event, touches in zip(
            converting, await rt.user_state.touches([e.user_id for e in converting]), strict=True
        ):
            for outcome in attribute_conversion(event, rt.config.by_conversion[event.event_type], touches):
                out.outcome(outcome)
    for piece in in_order(events, rt.config):
        await observe(rt, out, piece)
        await peak(rt, piece)
        members = await segment_verdicts(rt, piece)
        for event in piece:
            for message in match_event(event, rt.config.by_trigger.get(event.event_type, []), members):
                if message.priority is Priority.high:
                    rt.gate.note_urgent()
                out.send(topics.MATCHED.name, message.user_id, message)
