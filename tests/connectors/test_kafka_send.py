"""Many writers of one partition at once (stages' outputs, receipt callbacks) share the process's producer:
every record gets into Kafka, none waits out a timeout behind the others."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from connectors.kafka import send_keyed

pytestmark = pytest.mark.integration


def test_concurrent_record_batches_to_one_partition_all_arrive(local_stack, stack_env) -> None:
    settings = stack_env
    topic = f"loopcast.test.keyed.{uuid.uuid4().hex[:8]}"
    writers, each = 400, 5

    async def run() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(topic, 1, 1)])
        # As the worker's producer is set up; a short request timeout makes a queue that waits it out fail fast.
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap, linger_ms=2, max_batch_size=512 * 1024, request_timeout_ms=3000
        )
        await producer.start()
        try:

            async def write(n: int) -> None:
                records = [(f"user-{n}".encode(), f"{n}-{i}".encode()) for i in range(each)]
                await asyncio.gather(*await send_keyed(producer, topic, records))

            await asyncio.gather(*(write(n) for n in range(writers)))
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            seen: set[bytes] = set()
            deadline = asyncio.get_running_loop().time() + 30
            while len(seen) < writers * each and asyncio.get_running_loop().time() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    seen.update(r.value for r in records)
            return len(seen)
        finally:
            await consumer.stop()
            await admin.delete_topics([topic])
            await admin.close()

    assert asyncio.run(run()) == writers * each
