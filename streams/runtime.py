"""What the stages share inside one worker process: settings, config, Redis, providers, the
output buffer, dead letters; and the service that opens and closes them with the worker."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from connectors.audience_store import AudienceStore
from connectors.channels.base import ChannelAdapter, adapter_class
from connectors.kafka import partitions as kafka_partitions
from connectors.kafka import send_keyed
from connectors.policy_store import PolicyStore
from connectors.profiles import Profiles
from connectors.state import Coalesced, State
from infra import topics
from infra.settings import Settings
from schemas.contracts import encode
from schemas.models import DeadLetter, Outcome, Record
from streams.config_store import ConfigStore
from streams.failover import Routes
from streams.priority import PriorityGate
from streams.throttle import parse_quiet_hours

log = logging.getLogger("loopcast.runtime")


@dataclass
class Output:
    """Everything a batch produces, sent only after the whole batch was handled: a batch that
    fails part-way leaves nothing behind, and its input is retried or dead-lettered whole."""

    items: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    # The batch's input records as they came (by the identity of their decoded values): a value passed
    # on unchanged, as throttle passes a message to dispatch, goes out as those bytes, not re-encoded.
    wire: dict[int, bytes] = field(default_factory=dict)

    def send(self, topic: str, key: str | None, value: Record) -> bytes:
        """Queues the value; returns it as encoded."""
        data = self.wire.get(id(value)) or encode(value)
        self.send_encoded(topic, key, data)
        return data

    def send_encoded(self, topic: str, key: str | None, data: bytes) -> None:
        self.items.append((topic, key.encode() if key is not None else None, data))

    def outcome(self, outcome: Outcome) -> bytes:
        return self.send(topics.OUTCOMES.name, outcome.user_id, outcome)

    def dead_letter(self, stage: str, topic: str, partition: int, offset: int, key, original, exc) -> None:
        letter = DeadLetter(
            stage=stage,
            topic=topic,
            partition=partition,
            offset=offset,
            reason=str(exc)[:2000] or type(exc).__name__,
            error_type=type(exc).__name__,
            key=bytes(key) if key is not None else None,
            original=bytes(original or b""),
        )
        self.send(topics.DLQ.name, stage, letter)

    async def queue(self, producer: AIOKafkaProducer) -> list[asyncio.Future]:
        """Into the producer as whole record batches per partition, in order; returns the acks to await
        before the batch's offsets move on (at-least-once)."""
        by_topic: dict[str, list[tuple[bytes | None, bytes]]] = {}
        for topic, key, value in self.items:
            by_topic.setdefault(topic, []).append((key, value))
        acks = [ack for topic, records in by_topic.items() for ack in await send_keyed(producer, topic, records)]
        self.items.clear()
        return acks


class Recent(OrderedDict):
    """A bounded memory of recent results by key (oldest forgotten first)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def remember(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


class SharedDecodes:
    """Records two stages of this process read (feedback and monitor both read every outcome): the
    first to decode one leaves the value for the other, so each record is decoded once per process.
    Values are frozen models, safe to share. Bounded: a value the other stage never asks for (its
    partitions went to another process) is forgotten, oldest first."""

    def __init__(self, readers: dict[str, int], size: int = 100_000) -> None:
        # Topic -> stages of this process that read it; only topics with more than one are shared.
        self.readers = {topic: n for topic, n in readers.items() if n > 1}
        self.values: Recent = Recent(size)

    def decode(self, record, decode):
        if record.topic not in self.readers:
            return decode(record.value)
        key = (record.topic, record.partition, record.offset)
        entry = self.values.pop(key, None)
        if entry is not None:
            value, waiting = entry
            if waiting > 1:
                self.values.remember(key, (value, waiting - 1))
            return value
        value = decode(record.value)
        self.values.remember(key, (value, self.readers[record.topic] - 1))
        return value


class ConfigFollower:
    """Reads the compacted config topic from the start into a ConfigStore, then keeps following.

    `ready` is set once the store has caught up with the topic as it was at start, so no stage
    handles an event with a partial view of the campaigns.
    """

    def __init__(self, settings: Settings, store: ConfigStore) -> None:
        self.settings = settings
        self.store = store
        self.ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._positions: dict = {}
        # Set (and replaced) after every fetch of the config topic: what a barrier waits on.
        self._moved = asyncio.Event()

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap, enable_auto_commit=False, group_id=None
        )
        # The barrier asks for end offsets on a client of its own: the broker answers a connection's
        # requests in order, so behind the follower's long-poll fetch (500 ms on a quiet topic) the
        # question waited that long, and every match batch with it.
        self._offsets = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap, enable_auto_commit=False)
        await self._consumer.start()
        await self._offsets.start()
        partitions = await kafka_partitions(self._consumer, topics.CONFIG.name)
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        self._end = await self._consumer.end_offsets(partitions)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        positions = self._positions = {tp: 0 for tp in self._end}
        if all(end == 0 for end in self._end.values()):
            self.ready.set()
        while True:
            batches = await self._consumer.getmany(timeout_ms=500, max_records=1000)
            for tp, records in batches.items():
                for record in records:
                    self.store.apply(record.key.decode() if record.key else "", record.value)
                    positions[tp] = record.offset + 1
            if not self.ready.is_set() and all(positions[tp] >= end for tp, end in self._end.items()):
                log.info("config caught up: %d documents", len(self.store.documents))
                self.ready.set()
            self._moved.set()
            self._moved = asyncio.Event()

    async def barrier(self) -> None:
        """Wait until every document published before now is applied: a trigger that follows its
        campaign's publication onto Kafka is judged with that campaign, however close they came."""
        ends = await self._offsets.end_offsets(list(self._end))
        # The consumer's position, not the last record seen: compaction leaves offsets with no record.
        for tp, end in ends.items():
            while await self._consumer.position(tp) < end:
                await self._moved.wait()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._offsets.stop()
        await self._consumer.stop()


class Runtime(mode.Service):
    """Opens what the selected stages need when the worker starts, closes it when it stops."""

    def __init__(self, settings: Settings, *, owns_warehouse: bool, serve_http: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.config = ConfigStore()
        self.follower = ConfigFollower(settings, self.config)
        self.user_state: State | None = None
        self.policy: PolicyStore | None = None
        self.quiet_hours = parse_quiet_hours(settings.quiet_hours)
        self.gate = PriorityGate(settings.dispatch_slots, enabled=settings.priority_routing)
        # Outcomes of messages this process handed to a provider, so a retried batch never resends.
        # Kept encoded: bytes are invisible to the garbage collector, 200,000 models were not (a full
        # collection walked them all, a 100-250 ms pause of every stage in the process).
        self.handed_over = Recent(200_000)
        self.warehouse = None
        self.owns_warehouse = owns_warehouse
        self.serve_http = serve_http
        self._adapters: dict[tuple[str, int], ChannelAdapter] = {}
        self._adapter_source: dict[tuple[str, int], object] = {}
        # Provider health per route (circuit breakers), shared by every dispatch tier of this worker.
        self.routes = Routes()
        self.shared_decodes = SharedDecodes({})
        self._http_runner = None
        self._loops: list[asyncio.Task] = []
        self.producer: AIOKafkaProducer | None = None
        self.opened = asyncio.Event()

    async def on_start(self) -> None:
        self.user_state = State(self.settings.redis)
        self.profiles = Profiles(self.user_state.redis)
        self.audience = AudienceStore(self.settings.redis)
        # Sends recorded as they happen (a receipt may come right back), many per round trip.
        self.record_send = Coalesced(self.user_state.record_sends)
        self.policy = PolicyStore(self.settings.redis)
        # For what is produced outside the stage batches: tracking, receipts, ingest, released holds.
        # Also what every stage's output goes through, as whole record batches (Output.flush).
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap, linger_ms=2, max_batch_size=512 * 1024
        )
        # aiokafka logs each send at debug level: with the root logger open, every one built a record.
        logging.getLogger("aiokafka").setLevel(max(logging.INFO, logging.getLogger().getEffectiveLevel()))
        await self.producer.start()
        await self.follower.start()
        if self.owns_warehouse:
            from connectors import warehouse

            self.warehouse = await asyncio.to_thread(warehouse.connect, self.settings, owner=True)
            applied = await asyncio.to_thread(warehouse.migrate, self.warehouse)
            if applied:
                log.info("applied ClickHouse migrations: %s", ", ".join(applied))
            from streams.deferrals import DeferralLoop
            from streams.experiments import ExperimentLoop

            # One per deployment: these loops live with the warehouse owner, of which there is one.
            self._loops.append(asyncio.create_task(ExperimentLoop(self, self.settings.ab_interval_s).run()))
            self._loops.append(asyncio.create_task(DeferralLoop(self).run()))
        if self.serve_http:
            from console.http import start_http

            self._http_runner = await start_http(
                self.settings,
                self.user_state,
                self.producer,
                self.policy,
                self.warehouse,
                ready=self.follower.ready.is_set,
            )
        self.opened.set()

    async def wait_ready(self) -> None:
        await self.opened.wait()
        await self.follower.ready.wait()

    def adapter(self, channel_id: str, route: int = 0) -> ChannelAdapter:
        """One adapter per provider route of a channel, built on first use, rebuilt when the
        channel's config changes."""
        config = self.config.channel(channel_id)
        if config is None:
            raise LookupError(f"channel {channel_id!r} not configured")
        cached = self._adapters.get((channel_id, route))
        # The config store keeps one object per version of a channel: the same object, the same adapter.
        if cached is not None and self._adapter_source.get((channel_id, route)) is config:
            return cached
        channel = config.for_route(route)
        if cached is not None and cached.channel == channel:
            self._adapter_source[(channel_id, route)] = config
            return cached
        cls = adapter_class(channel.provider)
        adapter = cls(channel, cls.credentials_from(self.settings))
        self._adapters[(channel_id, route)] = adapter
        self._adapter_source[(channel_id, route)] = config
        if cached is not None:
            asyncio.ensure_future(cached.close())
        return adapter

    async def on_stop(self) -> None:
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for adapter in self._adapters.values():
            await adapter.close()
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        await self.follower.stop()
        if self.producer is not None:
            await self.producer.stop()
        if self.user_state is not None:
            await self.user_state.close()
            await self.audience.close()
        if self.policy is not None:
            await self.policy.close()
        if self.warehouse is not None:
            await asyncio.to_thread(self.warehouse.close)


def describe(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" at {frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno}" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"
