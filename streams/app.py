"""The worker: one consumer per stage in streams.topology, all sharing one batch loop.

Each stage reads its topics with an aiokafka consumer in the deployment's consumer group, so Kafka's
partitions, group membership and rebalances spread the work over as many worker processes as there
are partitions (`loopcast worker --processes N`). A batch is whatever the consumer has ready (a
batch closes when nothing more is queued, never on a timer). The loop decodes (undecodable input →
dead letter), hands the batch to the stage's handler, retries infrastructure hiccups, and if a batch
still fails isolates the bad item so one poisoned message never stops a partition. Offsets are
committed only after the batch's outputs are in Kafka.

Faust's agents carried each record through its consumer thread, conductor, queues and sensors:
about 150 µs of CPU per record per hop on this machine (no-op agent, batches of 1,000), against a
few µs for aiokafka's getmany — and a message makes eight such hops. mode, the service layer
Faust is built on, still runs the process: start-up order, signals, graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import mode
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra import topics
from infra.eventloop import use_fast_loop
from infra.settings import Settings
from schemas.codec import DecodeError
from schemas.contracts import codec
from streams import dispatch, feedback, match, monitor, render, throttle
from streams.render import RenderSettings
from streams.runtime import Output, Runtime, SharedDecodes, describe
from streams.topology import StageSpec

log = logging.getLogger("loopcast.worker")

Handler = Callable[[Runtime, Output, list], Awaitable[None]]

HANDLERS: dict[str, Handler] = {
    "match": match.handle,
    "render": render.handle,
    "throttle": throttle.handle,
    "dispatch.high": dispatch.handle,
    "dispatch.normal": dispatch.handle,
    "dispatch.low": dispatch.handle,
    "feedback": feedback.handle,
    "feedback.dlq": feedback.handle_dead_letters,
    "feedback.events": feedback.handle_events,
    "feedback.tags": feedback.handle_tag_changes,
    "feedback.alerts": feedback.handle_alerts,
    "monitor": monitor.handle,
}

# Failures of the infrastructure rather than of a message: retry the batch before blaming items.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, asyncio.TimeoutError, OSError)
TRANSIENT_ATTEMPTS = 5
# The longest the broker holds a fetch with nothing to return (aiokafka's default is 500 ms: at each of
# five hops a message could wait that long). aiokafka has one fetch in flight per broker, and a partition
# left out of it (its last records not handed on yet) waits for it to return, so on the send path each
# hop could wait this long: 20 ms gave 87 ms p99 at a paced 1k/s, 5 ms 42 ms (bench). Stages off the
# send path (warehouse, monitor) poll less often: a fetch every 5 ms costs CPU on an idle loop.
FETCH_WAIT_MS = 5
FETCH_WAIT_OFF_PATH_MS = 100
# A member that fetched nothing for IDLE_AFTER_S waits longer per fetch: on an idle loop the 5 ms polls kept
# the broker and the sending processes busy (the stack used 0.29 cores idle, now 0.06). Idle, no
# partition is left out of the fetch in flight, which returns as soon as a record arrives; the first records
# set the member back to its short wait before its next fetch is made.
IDLE_AFTER_S = 1.0
IDLE_FETCH_WAIT_MS = 500
# How long a stopping worker lets its stages finish the batches in hand.
STOP_GRACE_S = 10.0


class GroupMember:
    """This process's member of one consumer group: one consumer for every stage of the process that
    reads through that group, so a worker joins a few groups once instead of a group per stage (each
    join is a rebalance of every member). Each stage fetches only its own topics' partitions."""

    def __init__(self, settings: Settings, group: str) -> None:
        self.settings, self.group = settings, group
        self.loops: list[StageLoop] = []
        self.consumer: AIOKafkaConsumer | None = None
        # Set once the group has given this member its first partitions; `reassigned` at every assignment.
        self.assigned = asyncio.Event()
        self.reassigned = asyncio.Event()
        self.fetch_wait_ms = FETCH_WAIT_MS
        self.last_records = 0.0

    async def start(self) -> None:
        on_send_path = any(loop.spec.send_path for loop in self.loops)
        self.fetch_wait_ms = FETCH_WAIT_MS if on_send_path else FETCH_WAIT_OFF_PATH_MS
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            group_id=self.group,
            client_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=max(loop.batch_size for loop in self.loops),
            # Small, so a group forms fast and a dead worker's partitions move on quickly.
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            max_partition_fetch_bytes=4 << 20,
            fetch_max_wait_ms=self.fetch_wait_ms,
        )
        await self.consumer.start()
        self.last_records = asyncio.get_running_loop().time()
        names = sorted({t.name for loop in self.loops for t in loop.spec.inputs})
        self.consumer.subscribe(names, listener=_Rebalance(self))

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()

    def fetched(self, records: bool) -> None:
        """After each fetch of one of its stages: the wait of the member's next fetches, short while records
        come (or partitions are paused: they are left out of a fetch in flight), long once idle."""
        clock = asyncio.get_running_loop().time()
        if records or self.consumer.paused():
            self.last_records = clock
        idle = clock - self.last_records >= IDLE_AFTER_S
        # aiokafka reads the wait from its fetcher for every fetch it makes; it has no public setter.
        self.consumer._fetcher._fetch_max_wait_ms = IDLE_FETCH_WAIT_MS if idle else self.fetch_wait_ms


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, member: GroupMember) -> None:
        self.member = member

    async def on_partitions_revoked(self, revoked) -> None:
        # The batches in hand finish and commit first: the next owner starts after them, not before.
        for loop in self.member.loops:
            async with loop.busy:
                await loop.committed()

    async def on_partitions_assigned(self, assigned) -> None:
        self.member.assigned.set()
        self.member.reassigned.set()
        self.member.reassigned = asyncio.Event()


class StageLoop:
    """One stage: its batches from its topics' partitions, its commits."""

    def __init__(self, rt: Runtime, spec: StageSpec, settings: Settings, member: GroupMember) -> None:
        self.rt, self.spec, self.settings, self.member = rt, spec, settings, member
        self.handler = HANDLERS[spec.name]
        self.topics = {t.name for t in spec.inputs}
        # Bigger batches where a batch's fixed costs (commit, claims, one ClickHouse insert) dominate:
        # dispatch sat idle a third of the time between batches of 500 (bench dispatch).
        self.batch_size = settings.batch_size * (4 if spec.name.startswith(("feedback", "dispatch")) else 1)
        # ClickHouse wants few big inserts (each is a part to merge); nobody waits on a report row.
        self.linger_s = settings.warehouse_linger_s if spec.name.startswith("feedback") else 0.0
        # Set when the worker stops: the batch in hand (a lingering one too) is finished, not dropped.
        self.closing = False
        # Held while a batch is handled, so a rebalance takes partitions between batches (after `committed`).
        self.busy = asyncio.Lock()
        # Handled, not committed yet: the batches' produce acks and the offsets after them.
        self.acks: list[asyncio.Future] = []
        self.offsets: dict[TopicPartition, int] = {}
        self.committing: asyncio.Future | None = None
        self.last_commit = 0.0
        member.loops.append(self)

    def partitions(self) -> list[TopicPartition]:
        return [tp for tp in self.member.consumer.assignment() if tp.topic in self.topics]

    async def run(self) -> None:
        await self.member.assigned.wait()
        try:
            await self._batches()
        finally:
            await self.committed()

    async def committed(self) -> None:
        """Every batch handled so far: its outputs acknowledged and its offsets committed (a rebalance and
        a stop wait for this)."""
        await self._settle()
        self._commit_due(now=True)
        await self._settle()

    async def _settle(self) -> None:
        if self.committing is not None:
            committing, self.committing = self.committing, None
            await committing

    def _commit_due(self, *, now: bool = False) -> None:
        """Commits what was handled, at most every `commit_interval_s`, while the next batches are fetched
        and handled: the produce and commit round trips held every message behind them (1-5 ms of each
        hop's cycle at a paced 1k/s), and the next stage has the outputs once appended, acknowledged or
        not. One commit is in flight at a time, so they stay in order; a failed one (not a rebalance)
        stops the loop, as before."""
        if self.committing is not None:
            if not self.committing.done():
                return
            committing, self.committing = self.committing, None
            committing.result()
        clock = asyncio.get_running_loop().time()
        if not self.offsets or (not now and clock - self.last_commit < self.settings.commit_interval_s):
            return
        acks, offsets, self.acks, self.offsets = self.acks, self.offsets, [], {}
        self.last_commit = clock
        self.committing = asyncio.ensure_future(self._commit(acks, offsets))

    async def _batches(self) -> None:
        while not self.closing:
            fetched = await self._fetch(200, self.batch_size)
            if self.linger_s and fetched:
                await self._linger(fetched)
            if not fetched:
                self._commit_due()
                continue
            async with self.busy:
                records = [r for batch in fetched.values() for r in batch]
                await self.rt.wait_ready()
                if self.spec.config_barrier:
                    await self.rt.follower.barrier()
                self.acks += await process_batch(self.rt.producer, self.rt, self.spec, self.handler, records)
                self.offsets.update({tp: batch[-1].offset + 1 for tp, batch in fetched.items()})
                self._commit_due()

    async def _fetch(self, timeout_ms: int, most: int) -> dict:
        partitions = self.partitions()
        if not partitions:  # none of this stage's partitions are ours now (more members than partitions)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.member.reassigned.wait(), timeout_ms / 1000)
            return {}
        fetched = await self.member.consumer.getmany(*partitions, timeout_ms=timeout_ms, max_records=most)
        self.member.fetched(bool(fetched))
        return fetched

    async def _linger(self, fetched: dict) -> None:
        deadline = asyncio.get_running_loop().time() + self.linger_s
        count = sum(len(b) for b in fetched.values())
        while (
            not self.closing and count < self.batch_size and (left := deadline - asyncio.get_running_loop().time()) > 0
        ):
            for tp, batch in (await self._fetch(int(left * 1000) + 1, self.batch_size - count)).items():
                fetched.setdefault(tp, []).extend(batch)
                count += len(batch)

    async def _commit(self, acks: list[asyncio.Future], offsets: dict[TopicPartition, int]) -> None:
        await asyncio.gather(*acks)  # the batch's outputs are in Kafka first
        try:
            await self.member.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved to another worker mid-batch: it starts again from the last commit,
            # and every effect of a batch is idempotent (dedup keys, send claims, ClickHouse keys).
            log.warning("%s: offsets not committed after a rebalance: %s", self.spec.name, exc)

    def pause(self) -> None:
        if self.member.consumer is not None:
            self.member.consumer.pause(*self.partitions())

    def resume(self) -> None:
        if self.member.consumer is not None:
            self.member.consumer.resume(*self.partitions())


class StageWorker(mode.Service):
    """The process: the runtime first, then every selected stage's loop; stopped the other way round."""

    def __init__(self, settings: Settings, stages: list[StageSpec], **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        names = {s.name for s in stages}
        self.runtime = Runtime(
            settings,
            owns_warehouse="feedback" in names,
            # The tracking endpoints live with the warehouse owner so one process answers SQL too.
            serve_http="feedback" in names,
        )
        self.runtime.render_settings = RenderSettings(settings.http_base, settings.link_secret.get_secret_value())
        self.add_dependency(self.runtime)
        self.members: dict[str, GroupMember] = {}
        self.loops = []
        for spec in stages:
            group = spec.group(settings.app_id)
            member = self.members.setdefault(group, GroupMember(settings, group))
            self.loops.append(StageLoop(self.runtime, spec, settings, member))
        lower = [loop for loop in self.loops if loop.spec.inputs[0] in (topics.DISPATCH_NORMAL, topics.DISPATCH_LOW)]
        readers: dict[str, int] = {}
        for spec in stages:
            for topic in spec.inputs:
                readers[topic.name] = readers.get(topic.name, 0) + 1
        self.runtime.shared_decodes = SharedDecodes(readers)
        self.runtime.gate.bind(
            pause=lambda: [loop.pause() for loop in lower],
            resume=lambda: [loop.resume() for loop in lower],
        )
        self._tasks: list[asyncio.Task] = []
        self._announcing: asyncio.Task | None = None

    async def _announce(self) -> None:
        # A worker without an HTTP port says it is serving by a file: config read, in every group.
        await asyncio.gather(*(m.assigned.wait() for m in self.members.values()))
        await self.runtime.wait_ready()
        # What start-up built (modules, clients, the config) lives as long as the process: out of the
        # collector's sight, so a full collection walks only what the stages keep, not all of it.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        ready_file(self.settings).parent.mkdir(parents=True, exist_ok=True)
        ready_file(self.settings).write_text(str(os.getpid()))

    async def on_started(self) -> None:
        for member in self.members.values():
            await member.start()
        self._tasks = [asyncio.create_task(self._run(loop)) for loop in self.loops]
        self._announcing = asyncio.create_task(self._announce())

    async def _run(self, loop: StageLoop) -> None:
        try:
            await loop.run()
        except asyncio.CancelledError:
            raise
        except KafkaError as exc:
            log.error("%s: Kafka failed, stopping the worker: %s", loop.spec.name, describe(exc))
            await self.crash(exc)
        except Exception as exc:  # a bug in the loop itself: let the supervisor restart the process
            log.exception("%s: stage loop failed", loop.spec.name)
            await self.crash(exc)

    async def on_stop(self) -> None:
        if self._announcing is not None:
            self._announcing.cancel()
        for loop in self.loops:
            loop.closing = True
        # Each loop finishes the batch in hand (its outputs in Kafka, its offsets committed) and returns.
        _, late = await asyncio.wait(self._tasks, timeout=STOP_GRACE_S) if self._tasks else ((), ())
        for task in late:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(member.stop() for member in self.members.values()), return_exceptions=True)


# The cycle collector's thresholds in a worker (Python's are 700, 10, 10). Messages in flight are
# young objects that die by reference count, not in cycles: every collection in a 40k burst found
# nothing, yet at the defaults they cost 330-530 ms of CPU per process (1,000-1,500 passes, a dozen
# full ones), 30 µs a message; at these, 70-120 ms. Cyclic garbage (an exception and its frames) is
# still collected, later.
GC_THRESHOLDS = (50_000, 20, 100)


def ready_file(settings: Settings) -> Path:
    return settings.run_dir / f"{settings.app_id}.ready"


async def process_batch(producer, rt: Runtime, spec: StageSpec, handler: Handler, records) -> list[asyncio.Future]:
    """Decodes, handles and queues the batch's outputs for Kafka; returns their acks."""
    value_codec = codec(spec.value)
    decode = functools.partial(value_codec.decode, allow_json=spec.accepts_json, trusted=spec.trusted_input)
    shared = rt.shared_decodes.decode
    current = value_codec.header
    out = Output()
    good = []
    wire = {}
    for record in records:
        try:
            value = shared(record, decode)
        except DecodeError as exc:
            if not spec.dead_letters:
                continue
            out.dead_letter(spec.name, record.topic, record.partition, record.offset, record.key, record.value, exc)
            continue
        good.append((record, value))
        # Only bytes in the current schema can stand for the value (not JSON, not an older writer's).
        if record.value.startswith(current):
            wire[id(value)] = record.value
    if good:
        # `good` keeps every value alive while `wire` is used, so no other object can take an id in it.
        await _handle(rt, out, spec, handler, good, wire)
    return await out.queue(producer)


async def _handle(rt: Runtime, out: Output, spec: StageSpec, handler: Handler, good: list, wire=None) -> None:
    values = [value for _, value in good]
    wire = wire or {}
    for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
        batch_out = Output(wire=wire)
        try:
            await handler(rt, batch_out, values)
            out.items += batch_out.items
            return
        except TRANSIENT as exc:
            log.warning("%s: transient failure (attempt %d): %s", spec.name, attempt, describe(exc))
            await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
        except Exception as exc:  # a bad item or a bug: find which item, keep the rest flowing
            log.warning("%s: batch of %d failed, isolating: %s", spec.name, len(values), describe(exc))
            break
    for message, value in good:
        single = Output(wire=wire)
        try:
            await handler(rt, single, [value])
            out.items += single.items
        except Exception as exc:
            if spec.inputs[0] is topics.DLQ:
                # Dead letters are kept in their topic already; never dead-letter a dead letter.
                log.error("%s: could not store dead letter at offset %d: %s", spec.name, message.offset, describe(exc))
                continue
            out.dead_letter(
                spec.name,
                message.topic,
                message.partition,
                message.offset,
                message.key,
                message.value,
                RuntimeError(describe(exc)),
            )


def run_worker(settings: Settings, stages: list[StageSpec], loglevel: str = "info") -> None:
    from infra.stack import ensure_topics

    # Topics come with their declared partitions and retention before any consumer would make defaults.
    ensure_topics(settings)
    ready_file(settings).unlink(missing_ok=True)  # a previous run's
    use_fast_loop()
    worker = mode.Worker(StageWorker(settings, stages), loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
