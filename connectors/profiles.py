"""The live profile a segment is judged on, in Redis: attributes (the profile document), tags (a
set per user) and the recent behaviour the active segments count (a sorted set of event times per
user, trimmed to the longest window any segment looks back). One round trip per batch.

    profile:{user}   STRING  JSON attributes and channel addresses (connectors.state)
    tags:{user}      SET     current tags (also rebuilt by jobs/tags.py)
    ev:{user}        ZSET    "<event type>\x1f<event id>" → occurred_at (ms)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis

from connectors.state import profile_key
from schemas.models import Event, TagChange, TagChangeKind
from schemas.segments import ATTRIBUTES, UserFacts, coerce_value

SEP = "\x1f"
# Enough history per user for any count a segment asks ("3+ times in 7 days"), bounded in memory.
MAX_EVENTS_PER_USER = 500


def tags_key(user_id: str) -> str:
    return f"tags:{user_id}"


def events_key(user_id: str) -> str:
    return f"ev:{user_id}"


def typed_attributes(profile: dict[str, Any] | None) -> dict[str, Any]:
    """The whitelisted attributes of a stored profile, typed; a value of the wrong type counts as
    missing rather than failing the whole profile."""
    typed: dict[str, Any] = {}
    for name, kind in ATTRIBUTES.items():
        value = (profile or {}).get(name)
        if value is None:
            continue
        try:
            typed[name] = coerce_value(name, kind, value)
        except ValueError:
            continue
    return typed


class Profiles:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def observe(
        self,
        events: Sequence[Event],
        effects: Sequence[dict[str, tuple[bool, str]]],
        windows: dict[str, timedelta],
    ) -> list[TagChange]:
        """Record the behaviour segments count (only event types some segment uses, kept for its
        window) and apply tag effects (tag → (present, rule)); returns the tags that really changed."""
        pipe = self.redis.pipeline(transaction=False)
        applied: list[tuple[int, Event, str, bool, str]] = []  # (command index, …)
        # History is kept for the longest window any segment looks back (one set per user).
        keep_ms = int(max(windows.values()).total_seconds() * 1000) if windows else 0
        for event, effect in zip(events, effects, strict=True):
            if event.event_type in windows:
                key = events_key(event.user_id)
                at_ms = int(event.occurred_at.timestamp() * 1000)
                pipe.zadd(key, {f"{event.event_type}{SEP}{event.event_id}": at_ms})
                pipe.zremrangebyscore(key, "-inf", at_ms - keep_ms)
                pipe.zremrangebyrank(key, 0, -MAX_EVENTS_PER_USER - 1)
                pipe.pexpire(key, keep_ms + 86_400_000)
            for tag, (present, rule) in effect.items():
                applied.append((len(pipe.command_stack), event, tag, present, rule))
                (pipe.sadd if present else pipe.srem)(tags_key(event.user_id), tag)
        if not pipe.command_stack:
            return []
        results = await pipe.execute()
        # SADD/SREM answer 1 when the set changed: only real changes become history.
        return [
            TagChange(
                user_id=event.user_id,
                tag=tag,
                change=TagChangeKind.added if present else TagChangeKind.removed,
                source=rule,
                occurred_at=event.occurred_at,
            )
            for index, event, tag, present, rule in applied
            if results[index]
        ]

    async def merge(self, updates: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Apply profile updates (user id, changed fields; None removes a field) in order and return
        each user's whole profile afterwards. One writer per user: the events partition of that user."""
        users = list(dict.fromkeys(user_id for user_id, _ in updates))
        current = await self.redis.mget([profile_key(u) for u in users])
        profiles = {u: (json.loads(raw) if raw else {"user_id": u}) for u, raw in zip(users, current, strict=True)}
        for user_id, fields in updates:
            profile = profiles[user_id]
            for name, value in fields.items():
                if value is None:
                    profile.pop(name, None)
                elif name != "user_id":
                    profile[name] = value
        pipe = self.redis.pipeline(transaction=False)
        for user_id, profile in profiles.items():
            pipe.set(profile_key(user_id), json.dumps(profile, ensure_ascii=False, default=str))
        await pipe.execute()
        return list(profiles.values())

    async def facts(self, user_ids: Sequence[str], lookback: timedelta, now: datetime | None = None) -> list[UserFacts]:
        """Attributes, tags and the last `lookback` of behaviour for each user, in one round trip."""
        now = now or datetime.now(UTC)
        since_ms = int((now - lookback).timestamp() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.get(profile_key(user_id))
            pipe.smembers(tags_key(user_id))
            pipe.zrangebyscore(events_key(user_id), since_ms, "+inf", withscores=True)
        results = await pipe.execute()
        facts = []
        for i, user_id in enumerate(user_ids):
            raw, tags, history = results[3 * i : 3 * i + 3]
            events: dict[str, list[datetime]] = {}
            for member, at_ms in history:
                kind = (member.decode() if isinstance(member, bytes) else member).split(SEP, 1)[0]
                events.setdefault(kind, []).append(datetime.fromtimestamp(at_ms / 1000, UTC))
            facts.append(
                UserFacts(
                    user_id=user_id,
                    attributes=typed_attributes(json.loads(raw) if raw else None),
                    tags={t.decode() if isinstance(t, bytes) else t for t in tags},
                    events=events,
                )
            )
        return facts
