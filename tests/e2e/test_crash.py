"""A worker killed after handing messages to the provider but before committing its offsets:
Kafka redelivers, and the send claims keep every message from being sent a second time."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime

import httpx
import pytest

from connectors.kafka import produce
from connectors.state import State
from infra import topics
from infra.stack import read_pid_file
from infra.waiting import wait_for
from schemas.config import Campaign, Channel, Template, Trigger
from schemas.models import Event

pytestmark = pytest.mark.e2e

USERS = [f"crash-user-{i:02d}" for i in range(40)]


def stats(settings) -> dict:
    items = httpx.get(f"{settings.sandbox_base}/_sandbox/webhook/requests", params={"limit": 100000}).json()["items"]
    mine = [i["body"]["message_id"] for i in items if i["body"]["campaign_id"] == "crash"]
    return {"received": len(mine), "unique": len(set(mine))}


def test_killed_worker_does_not_send_twice(worker, local_stack) -> None:
    settings = worker
    documents = [
        Channel(id="crash-ch", provider="webhook", url=f"{settings.sandbox_base}/webhook/crash"),
        Template(id="crash-t", body="${name}, hello"),
        Campaign(
            id="crash", name="crash", trigger=Trigger(event_type="crash_go"), channel="crash-ch", template_id="crash-t"
        ),
    ]

    async def setup() -> None:
        state = State(settings.redis)
        await state.put_profiles([{"user_id": u, "name": u[-2:]} for u in USERS])
        await state.close()
        await produce(settings.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in documents])

    asyncio.run(setup())
    # A slow provider: sends are in flight (handed over, not yet acknowledged) when the worker dies.
    faults = f"{settings.sandbox_base}/_sandbox/webhook/faults"
    httpx.post(faults, json={"latency_ms": 1500}).raise_for_status()
    try:
        now = datetime.now(UTC)
        events = [Event(event_id=f"{u}-crash", event_type="crash_go", user_id=u, occurred_at=now) for u in USERS]
        asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in events]))
        wait_for(lambda: stats(settings)["received"] >= 1, timeout_s=60, what="the first message at the provider")
        record = read_pid_file(settings.run_dir / "worker.pid")
        os.kill(record.pid, signal.SIGKILL)
        wait_for(lambda: not record.is_alive(), timeout_s=10, what="the worker to die")
        httpx.post(faults, json={"latency_ms": 0}).raise_for_status()
        local_stack.up(["worker"])  # a new worker: Kafka redelivers whatever was not committed
        wait_for(lambda: stats(settings)["unique"] == len(USERS), timeout_s=120, what="every message at the provider")
    finally:
        httpx.post(faults, json={"latency_ms": 0})
    # Give a redelivery every chance to show up as a second send: wait until the outcomes are all in.
    from connectors import warehouse

    wh = warehouse.connect(settings)
    try:
        wait_for(
            lambda: (
                wh.query(
                    "SELECT uniqExact(message_id) AS n FROM outcomes WHERE campaign_id = 'crash' "
                    "AND code IN ('sent', 'deduplicated')"
                )[0]["n"]
                == len(USERS)
            ),
            timeout_s=120,
            what="a terminal outcome for every message",
        )
    finally:
        wh.close()
    assert stats(settings) == {"received": len(USERS), "unique": len(USERS)}
