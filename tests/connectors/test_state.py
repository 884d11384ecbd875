"""Redis state against the real Redis of the local stack."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from connectors.state import State
from streams.match import Touch

pytestmark = pytest.mark.integration


def test_send_claims_are_exclusive_across_processes_and_reentrant_within_one(local_stack, stack_env) -> None:
    async def scenario() -> tuple[list[bool], list[bool], list[bool]]:
        first, second = State(stack_env.redis), State(stack_env.redis)
        try:
            ids = [f"claim-{i}" for i in range(10)]
            mine = await first.claim_sends(ids[:6])
            # Another process (a redelivery after a crash) must not send these again...
            theirs = await second.claim_sends(ids)
            # ...but the same process retrying its batch still may.
            again = await first.claim_sends(ids[:6])
            return mine, theirs, again
        finally:
            await first.close()
            await second.close()

    mine, theirs, again = asyncio.run(scenario())
    assert mine == [True] * 6 and theirs == [False] * 6 + [True] * 4 and again == [True] * 6


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
