"""Scale-out the way Kafka scales: a second worker process joins the stages' consumer groups, the
partitions are shared between the two, it leaves again — and every message arrives exactly once."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import httpx
import pytest

from infra.waiting import wait_for
from schemas.config import Campaign, Channel, Template, Trigger
from streams.policy import QuietHours
from tests.e2e.stack_io import fire, publish

pytestmark = pytest.mark.e2e

USERS = [f"scale-user-{i:03d}" for i in range(200)]


def arrived(settings) -> Counter:
    items = httpx.get(f"{settings.sandbox_base}/_sandbox/webhook/requests", params={"limit": 100000}).json()["items"]
    return Counter(i["body"]["message_id"] for i in items if i["body"]["campaign_id"] == "scale")


def group_members(settings, group: str) -> int:
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def count() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            [described] = (await admin.describe_consumer_groups([group]))[0].groups
            return len(described[5])  # members
        finally:
            await admin.close()

    return asyncio.run(count())


def test_a_second_process_shares_the_partitions_and_nothing_arrives_twice(worker) -> None:
    settings = worker
    publish(
        settings,
        [
            Channel(id="scale-ch", provider="webhook", url=f"{settings.sandbox_base}/webhook/scale",
                    options={"batch_max": "100"}),
            Template(id="scale-t", body="${name}, hello"),
            Campaign(id="scale", name="scale", trigger=Trigger(event_type="scale_go"), channel="scale-ch",
                     template_id="scale-t", daily_cap=1000, quiet_hours=QuietHours(enabled=False)),
        ],
        [{"user_id": u, "name": u[-3:]} for u in USERS],
    )  # fmt: skip
    members_before = group_members(settings, settings.app_id)
    second = subprocess.Popen(
        [sys.executable, "-m", "console", "worker", "--processes", "1", "--stages", "match,render,throttle,dispatch"]
    )
    try:
        # The process joins the stages' group once: match, render, throttle and dispatch share its member.
        wait_for(lambda: group_members(settings, settings.app_id) >= members_before + 1, timeout_s=60,
                 what="the second process in the stages' consumer groups")  # fmt: skip
        fire(settings, "scale_go", USERS[:100])
        wait_for(lambda: len(arrived(settings)) >= 100, timeout_s=90, what="the first 100 messages")
    finally:
        second.terminate()
        second.wait(timeout=60)
    # Its partitions go back to the first process; what it had not committed is handled again there.
    fire(settings, "scale_go", USERS[100:])
    wait_for(lambda: len(arrived(settings)) >= 200, timeout_s=90, what="all 200 messages")
    counts = arrived(settings)
    assert len(counts) == 200 and max(counts.values()) == 1, counts.most_common(3)
