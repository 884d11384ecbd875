"""Redis state against the real Redis of the local stack."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from connectors.state import State
from streams.match import Touch

pytestmark = pytest.mark.integration


def test_caps_are_atomic_across_clients_and_idempotent_per_message(local_stack, stack_env) -> None:
    async def scenario() -> tuple[list[bool], list[bool]]:
        workers = [State(stack_env.redis) for _ in range(2)]
        try:
            key = "cap:day:cap-user:20261124"
            # Two "workers" race 40 different messages for one user with a cap of 5.
            claims = [[(key, f"m{w}-{i}", 5)] for w in range(2) for i in range(20)]
            results = await asyncio.gather(*(workers[n % 2].claim_caps(c, 60) for n, c in enumerate(claims)))
            again = await workers[0].claim_caps([(key, m, 5) for m in ("m0-0", "m1-0", "m0-1", "brand-new")], 60)
            return [r[0] for r in results], again
        finally:
            for w in workers:
                await w.close()

    first, again = asyncio.run(scenario())
    assert sum(first) == 5
    allowed = {f"m{w}-{i}" for n, (w, i) in enumerate((w, i) for w in range(2) for i in range(20)) if first[n]}
    # A redelivered message keeps its answer; a new one is still refused.
    assert again == [m in allowed for m in ("m0-0", "m1-0", "m0-1")] + [False]


def test_profiles_touches_and_receipts(local_stack, stack_env) -> None:
    async def scenario():
        state = State(stack_env.redis)
        try:
            await state.put_profiles([{"user_id": "p1", "name": "小红", "vip_level": 2}])
            profiles = await state.profiles(["p1", "nobody"])
            t = datetime(2026, 11, 24, tzinfo=UTC)
            touch = Touch(message_id="m1", campaign_id="c1", channel="webhook", triggered_at=t, sent_at=t)
            await state.record_sends([("p1", touch, "webhook", "wh-1")])
            return profiles, await state.touches(["p1", "nobody"]), await state.receipt_target("webhook", "wh-1")
        finally:
            await state.close()

    profiles, touches, target = asyncio.run(scenario())
    assert profiles == [{"user_id": "p1", "name": "小红", "vip_level": 2}, None]
    assert touches[0]["c1"].message_id == "m1" and touches[1] == {}
    assert (target["message_id"], target["user_id"]) == ("m1", "p1")
