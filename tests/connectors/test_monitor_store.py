"""MonitorStore against the real Redis of the local stack: counts from several workers add up in the
shared buckets, and of two workers that see the same drop (or recovery) exactly one fires it."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from connectors.monitor_store import MonitorStore, bucket_key
from connectors.state import redis_client
from infra.settings import Settings
from schemas.models import Severity
from streams.monitor import OpenAlert, Tally, windows

pytestmark = pytest.mark.integration

CFG = Settings(monitor_bucket_s=1, monitor_window_s=10, monitor_baseline_s=60, monitor_recover_s=10).monitor
NOW = 1_800_000_000.5
A, B = ("shop-hook", "webhook"), ("ops", "wecom-bot")


def test_workers_share_counts_and_only_one_opens_or_closes(local_stack, stack_env) -> None:
    app_id = f"t-{uuid.uuid4().hex[:8]}"  # the session's Redis is shared: keys of this test only
    span = windows(NOW, CFG)
    b = span.now

    async def scenario():
        redis = redis_client(stack_env.redis)
        one, two = MonitorStore(redis, app_id, CFG), MonitorStore(redis, app_id, CFG)
        try:
            await one.add_and_read({A: {b - 1: Tally(3, 1), b: Tally(2, 0)}}, span)
            seen, states = await two.add_and_read({A: {b: Tally(1, 4)}, B: {span.oldest: Tally(9, 0)}}, span)
            assert seen[A] == {b - 1: Tally(3, 1), b: Tally(3, 4)}
            assert seen[B] == {span.oldest: Tally(9, 0)} and states == {}
            ttl = await redis.ttl(bucket_key(app_id, b))
            assert 0 < ttl <= one.ttl_s
            state = OpenAlert(alert_id="x", baseline=0.99, current=0.2, opened_at=NOW, severity=Severity.critical)
            opened = await asyncio.gather(one.open(A, state), two.open(A, state.model_copy(update={"alert_id": "y"})))
            assert sorted(opened) == [False, True]
            _, states = await one.add_and_read({A: {b: Tally(1, 0)}}, span)
            assert states[A].alert_id == ("x" if opened[0] else "y")
            closed = await asyncio.gather(one.close(A), two.close(A))
            assert sorted(closed) == [False, True]
            _, states = await two.add_and_read({A: {b: Tally(1, 0)}}, span)
            assert states == {}
        finally:
            await redis.aclose()

    asyncio.run(scenario())
