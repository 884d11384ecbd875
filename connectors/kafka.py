"""Small Kafka helpers: batched produce (every stage's output and the receipts go through send_keyed),
reading a topic to its current end, group lag, and skipping a backlog (CLI, demo, benchmark, tests)."""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner, murmur2

from schemas.contracts import encode
from schemas.models import Record


async def produce_raw(
    bootstrap: str, topic: str, items: Iterable[tuple[bytes | None, bytes | None]], *, linger_ms: int = 5
) -> int:
    """Sends (key, value) pairs in producer batches; returns how many were acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms, max_batch_size=256 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in items]
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


async def produce(bootstrap: str, topic: str, records: Sequence[tuple[str, Record]]) -> int:
    return await produce_raw(bootstrap, topic, ((key.encode(), encode(value)) for key, value in records))


async def partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """A new consumer knows no topics until it asks; ask, then list the topic's partitions."""
    # consumer.topics() fetches metadata into a copy and returns only names; keep the copy.
    cluster = await consumer._client.fetch_all_metadata()
    found = cluster.partitions_for_topic(topic)
    if not found:
        raise LookupError(f"topic {topic} does not exist")
    return [TopicPartition(topic, p) for p in sorted(found)]


async def read_to_end(bootstrap: str, topic: str, *, timeout_s: float = 30) -> list:
    """Every record of a topic from the beginning up to its end offsets at call time."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        assigned = await partitions(consumer, topic)
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        ends = await consumer.end_offsets(assigned)
        records = []
        remaining = {tp for tp, end in ends.items() if end > 0}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while remaining and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, items in batch.items():
                records += items
                if items and items[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
        if remaining:
            raise TimeoutError(f"could not read {topic} to its end within {timeout_s}s")
        return records
    finally:
        await consumer.stop()


async def end_offsets(bootstrap: str, topic: str) -> int:
    """Total records ever written to a topic (the sum of its partitions' end offsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(await partitions(consumer, topic))).values())
    finally:
        await consumer.stop()


async def group_lag(bootstrap: str, group_id: str, topic_names: Sequence[str]) -> int:
    """How many records of these topics the consumer group has not committed yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group_id)
        ends = await consumer.end_offsets([tp for t in topic_names for tp in await partitions(consumer, t)])
        return sum(
            end - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
            for tp, end in ends.items()
        )
    finally:
        await consumer.stop()
        await admin.close()


@functools.lru_cache(maxsize=1 << 16)
def _index_of(key: bytes, count: int) -> int:
    """Which of `count` partitions (sorted) the default partitioner gives a key: the murmur2 hash of any
    keyed send. Remembered: one user's records pass through every stage of the same process, and the
    hash is pure Python (1-2 µs a key)."""
    return (murmur2(key) & 0x7FFFFFFF) % count


_PLACE = DefaultPartitioner()
# One writer of whole record batches per producer and partition at a time. aiokafka's send_batch waits
# for the partition's queued batch to be drained, and with many waiters its timeout runs out for them all
# (its elapsed time is subtracted again on every lap): 400 receipt callbacks at once to one partition
# failed with KafkaTimeoutError. Taking turns here, each waits one short drain.
_TURNS: weakref.WeakKeyDictionary[AIOKafkaProducer, dict[TopicPartition, asyncio.Lock]] = weakref.WeakKeyDictionary()


async def _send_batch(producer: AIOKafkaProducer, batch, topic: str, partition: int) -> asyncio.Future:
    turn = _TURNS.setdefault(producer, {}).setdefault(TopicPartition(topic, partition), asyncio.Lock())
    async with turn:
        return await producer.send_batch(batch, topic, partition=partition)


async def send_keyed(
    producer: AIOKafkaProducer, topic: str, items: Sequence[tuple[bytes | None, bytes]]
) -> list[asyncio.Future]:
    """Many keyed records as whole batches per partition, placed by the same partitioner as any
    keyed send (so a user's records keep their order with other producers'): per-record send()
    costs more CPU than building the records (broadcast fan-out, every stage's output)."""
    partitions = sorted(await producer.partitions_for(topic))
    by_partition: dict[int, list[tuple[bytes | None, bytes]]] = {}
    for key, value in items:
        if key is None:  # where the partitioner's random choice puts it, as with send()
            partition = _PLACE(None, partitions, partitions)
        else:
            partition = partitions[_index_of(key, len(partitions))]
        by_partition.setdefault(partition, []).append((key, value))
    acks = []
    for partition, records in by_partition.items():
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:
                batch.close()
                acks.append(await _send_batch(producer, batch, topic, partition))
                batch = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    # Larger than a whole batch: send says why (MessageSizeTooLargeError).
                    acks.append(await producer.send(topic, value, key=key, partition=partition))
        batch.close()
        if batch.record_count():
            acks.append(await _send_batch(producer, batch, topic, partition))
    return acks


async def skip_to_end(bootstrap: str, group_id: str, topic_names: Sequence[str]) -> int:
    """Move a consumer group past everything queued in these topics (while none of its members
    runs); returns how many records were skipped. For benchmarks that must not inherit a backlog."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        assigned = [tp for name in topic_names for tp in await partitions(consumer, name)]
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        skipped = 0
        for tp in assigned:
            committed = await consumer.committed(tp)
            skipped += ends[tp] - (committed or 0)
        await consumer.commit(ends)
        return skipped
    finally:
        await consumer.stop()
