"""A stage's consumer on an idle loop polls the broker rarely, yet the first record after the quiet is
handed over as soon as it is appended, and the polls are short again while records come."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra.topics import TopicSpec
from schemas.models import MatchedMessage
from streams.app import FETCH_WAIT_MS, IDLE_AFTER_S, IDLE_FETCH_WAIT_MS, GroupMember, StageLoop
from streams.topology import StageSpec

pytestmark = pytest.mark.integration


def test_an_idle_member_polls_long_and_a_record_still_arrives_at_once(local_stack, stack_env) -> None:
    settings = stack_env
    topic = f"loopcast.test.idle.{uuid.uuid4().hex[:8]}"
    # A send-path stage (render) reading a topic of its own, in a group of its own.
    spec = StageSpec("render", (TopicSpec(topic),), MatchedMessage, ())

    async def run() -> tuple[int, int, float, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(topic, 2, 1)])
        member = GroupMember(settings, f"loopcast-test.idle.{uuid.uuid4().hex[:8]}")
        stage = StageLoop(None, spec, settings, member)
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
        await member.start()
        await producer.start()
        clock = asyncio.get_running_loop().time
        try:
            await asyncio.wait_for(member.assigned.wait(), 30)
            waits = lambda: member.consumer._fetcher._fetch_max_wait_ms  # noqa: E731 - what the next fetch asks for
            busy_wait = waits()
            deadline = clock() + 10 * IDLE_AFTER_S
            while waits() != IDLE_FETCH_WAIT_MS and clock() < deadline:
                assert not await stage._fetch(100, 10)
            idle_wait = waits()
            assert not await stage._fetch(100, 10)  # the fetch in flight now is a long one
            await producer.send_and_wait(topic, b"one", key=b"user-1")
            sent_at, got = clock(), {}
            while not got and clock() < sent_at + 5:
                got = await stage._fetch(2 * IDLE_FETCH_WAIT_MS, 10)
            assert got, "the record never arrived"
            return busy_wait, idle_wait, clock() - sent_at, waits()
        finally:
            await producer.stop()
            await member.stop()
            await admin.delete_topics([topic])
            await admin.close()

    busy_wait, idle_wait, took_s, wait_after = asyncio.run(run())
    assert (busy_wait, idle_wait, wait_after) == (FETCH_WAIT_MS, IDLE_FETCH_WAIT_MS, FETCH_WAIT_MS)
    # Handed over on arrival, not when the long poll in flight ran out.
    assert took_s < IDLE_FETCH_WAIT_MS / 1000 / 2
