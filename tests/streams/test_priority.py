"""The dispatch slot gate: urgent first, lower tiers never starve, FIFO when routing is off."""

from __future__ import annotations

import asyncio

import pytest

from streams.priority import PriorityGate

pytestmark = pytest.mark.unit


async def order_served(gate: PriorityGate, queued: list[str]) -> list[str]:
    """One slot, held; messages queue in the given order; the order they get the slot is returned."""
    await gate.acquire("high")  # occupy the only slot so everyone queues
    served: list[str] = []

    async def send(tier: str) -> None:
        await gate.acquire(tier)
        served.append(tier)
        gate.release()

    tasks = [asyncio.create_task(send(tier)) for tier in queued]
    await asyncio.sleep(0)  # let them all queue (scheduling, not synchronisation: no timing involved)
    gate.release()
    await asyncio.gather(*tasks)
    return served


# (shares, routing enabled, queued, expected service order)
CASES = [
    ({}, True, ["low", "normal", "high", "low", "high"], ["high", "high", "normal", "low", "low"]),
    ({}, False, ["low", "normal", "high"], ["low", "normal", "high"]),
]


@pytest.mark.parametrize(("shares", "enabled", "queued", "expected"), CASES)
def test_service_order(shares, enabled, queued, expected) -> None:
    assert asyncio.run(order_served(PriorityGate(1, shares=shares, enabled=enabled), queued)) == expected


def test_lower_tiers_get_their_guaranteed_share() -> None:
    queued = ["low"] * 50 + ["high"] * 200
    served = asyncio.run(order_served(PriorityGate(1, shares={"low": 0.1}), queued))
    first_100 = served[:100]
    # Low waits behind high, but not entirely: about its 10% share while high has backlog.
    assert 5 <= first_100.count("low") <= 15 and served[0] == "high"
    assert served.count("low") == 50  # and nothing is lost


def test_urgent_traffic_pauses_lower_tiers_then_resumes() -> None:
    events: list[str] = []

    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        gate = PriorityGate(4, hold_s=0.2, max_pause_s=0.5, resume_s=0.05)
        gate.bind(pause=lambda: events.append("pause"), resume=lambda: events.append("resume"))
        started = loop.time()
        # Urgent messages keep arriving for 0.8 s: paused, a short resume at the 0.5 s cap (the
        # lower tiers' share), paused again, then resumed once the urgency has passed.
        while loop.time() - started < 0.8:
            gate.note_urgent()
            await asyncio.sleep(0.02)  # the simulated arrival rate of urgent messages
        deadline = loop.time() + 5
        while events[-1:] != ["resume"] or gate.paused_since is not None:
            assert loop.time() < deadline, events
            await asyncio.sleep(0.01)
        return events

    assert asyncio.run(scenario()) == ["pause", "resume", "pause", "resume"]


def test_no_pausing_without_routing() -> None:
    async def scenario() -> list[str]:
        events: list[str] = []
        gate = PriorityGate(4, enabled=False)
        gate.bind(pause=lambda: events.append("pause"), resume=lambda: events.append("resume"))
        gate.note_urgent()
        return events

    assert asyncio.run(scenario()) == []
