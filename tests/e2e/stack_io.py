"""What every e2e test does to the running stack: publish config and profiles, fire events, and
read what really arrived at a provider's sandbox."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime

import httpx

from connectors.kafka import produce
from connectors.state import State
from infra import topics
from schemas.models import Event


def publish(settings, documents: Iterable = (), profiles: Iterable[dict] = ()) -> None:
    """Profiles into Redis first, then the documents onto the config topic."""

    async def go() -> None:
        state = State(settings.redis)
        await state.put_profiles(list(profiles))
        await state.close()
        docs = list(documents)
        if docs:
            await produce(settings.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in docs])

    asyncio.run(go())


def fire(settings, event_type: str, users: Iterable[str], suffix: str = "") -> None:
    """One event of `event_type` per user, ids made from user, type and suffix (same suffix: a replay)."""
    now = datetime.now(UTC)
    events = [
        Event(event_id=f"{u}-{event_type}{suffix}", event_type=event_type, user_id=u, occurred_at=now) for u in users
    ]
    fire_events(settings, events)


def fire_events(settings, events: Iterable[Event]) -> None:
    """These events, in order, each keyed by its user (one user's events stay in order)."""
    asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in events]))


def received(settings, scheme: str = "webhook", campaign_id: str | None = None) -> list[dict]:
    """Request bodies the provider's sandbox recorded (optionally one campaign's)."""
    url = f"{settings.sandbox_base}/_sandbox/{scheme}/requests"
    bodies = [i["body"] for i in httpx.get(url, params={"limit": 100000}).json()["items"]]
    return bodies if campaign_id is None else [b for b in bodies if b.get("campaign_id") == campaign_id]
