"""Feedback: outcomes and dead letters into ClickHouse, in batches (one insert per poll)."""

from __future__ import annotations

import asyncio

from schemas.models import DeadLetter, Outcome


async def handle(rt, out, outcomes: list[Outcome]) -> None:
    from connectors.warehouse import insert_outcomes

    await asyncio.to_thread(insert_outcomes, rt.warehouse, outcomes)


async def handle_dead_letters(rt, out, letters: list[DeadLetter]) -> None:
    from connectors.warehouse import insert_dead_letters

    await asyncio.to_thread(insert_dead_letters, rt.warehouse, letters)
