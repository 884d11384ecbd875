"""Feedback: outcomes, dead letters, behaviour, tag changes and alerts into ClickHouse, in batches (one
insert per poll)."""

from __future__ import annotations

import asyncio

from schemas.models import PROFILE_UPDATED, Alert, DeadLetter, Event, Outcome, TagChange


async def handle(rt, out, outcomes: list[Outcome]) -> None:
    from connectors.warehouse import insert_outcomes

    await asyncio.to_thread(insert_outcomes, rt.warehouse, outcomes)


async def handle_dead_letters(rt, out, letters: list[DeadLetter]) -> None:
    from connectors.warehouse import insert_dead_letters

    await asyncio.to_thread(insert_dead_letters, rt.warehouse, letters)


async def handle_events(rt, out, events: list[Event]) -> None:
    """Behaviour into user_events; profile updates merged into the live profile (Redis) and the
    user's row of user_attributes (ClickHouse), so segments see the same user in both."""
    from connectors.warehouse import insert_user_attributes, insert_user_events

    updates = [(e.user_id, e.properties) for e in events if e.event_type == PROFILE_UPDATED]
    if updates:
        merged = await rt.profiles.merge(updates)
        await asyncio.to_thread(insert_user_attributes, rt.warehouse, merged)
    await asyncio.to_thread(insert_user_events, rt.warehouse, [e for e in events if e.event_type != PROFILE_UPDATED])


async def handle_alerts(rt, out, alerts: list[Alert]) -> None:
    from connectors.warehouse import insert_alerts

    await asyncio.to_thread(insert_alerts, rt.warehouse, alerts)


async def handle_tag_changes(rt, out, changes: list[TagChange]) -> None:
    from connectors.warehouse import insert_tag_changes

    await asyncio.to_thread(insert_tag_changes, rt.warehouse, changes)
