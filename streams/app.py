"""The Faust app: one thin agent per stage in streams.topology, all sharing one batch loop.

The loop decodes (undecodable input → dead letter), hands the batch to the stage's handler,
retries infrastructure hiccups, and if a batch still fails isolates the bad item so one poisoned
message never stops a partition. Offsets move on only after the batch's outputs are in Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import faust
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from infra import topics
from infra.eventloop import use_fast_loop
from infra.settings import Settings
from schemas.codec import DecodeError
from schemas.contracts import codec
from streams import dispatch, feedback, match, monitor, render, throttle
from streams.render import RenderSettings
from streams.runtime import Output, Runtime, describe
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


def build(settings: Settings, stages: list[StageSpec]) -> tuple[faust.App, Runtime]:
    app = faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        # Faust keeps local state under its datadir (default: the current directory); keep it with ours.
        datadir=str(settings.home / "faust"),
        web_enabled=False,
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10,
        broker_heartbeat_interval=1,
        broker_max_poll_records=settings.batch_size * 2,
        producer_linger_ms=2,
        stream_wait_empty=False,
        # Two batches per stream: enough to keep a stage busy, small enough that a paused tier's
        # buffered messages drain in a moment.
        stream_buffer_maxsize=settings.batch_size * 2,
    )
    names = {s.name for s in stages}
    runtime = Runtime(
        settings,
        owns_warehouse="feedback" in names,
        # The tracking endpoints live with the warehouse owner so one process answers SQL too.
        serve_http="feedback" in names,
    )
    runtime.render_settings = RenderSettings(settings.http_base, settings.link_secret.get_secret_value())
    for spec in stages:
        _wire(app, runtime, spec, settings)
    lower = {topics.DISPATCH_NORMAL.name, topics.DISPATCH_LOW.name}

    def lower_partitions():
        return [tp for tp in app.consumer.assignment() if tp.topic in lower]

    runtime.gate.bind(
        pause=lambda: pause_fetching(app.consumer, lower_partitions()),
        resume=lambda: app.consumer.resume_partitions(lower_partitions()),
    )

    @app.on_partitions_assigned.connect
    async def announce(sender, *args, **kwargs) -> None:
        # A worker without an HTTP port says it is serving by a file: config read, partitions owned.
        await runtime.wait_ready()
        ready_file(settings).parent.mkdir(parents=True, exist_ok=True)
        ready_file(settings).write_text(str(os.getpid()))

    return app, runtime


def pause_fetching(consumer, partitions) -> None:
    """Consumer.pause_partitions without losing records. Faust's version edits the very set its
    fetch loop is iterating with, so the rest of the batch in flight for a paused partition was
    skipped, and the consumer's position had already moved past it. A new set leaves that batch
    whole; what aiokafka has fetched beyond it stays in aiokafka's buffer until the resume."""
    paused = set(partitions)
    if paused:
        consumer._paused_partitions.update(paused)
        consumer._active_partitions = set(consumer._get_active_partitions()) - paused


def ready_file(settings: Settings) -> Path:
    return settings.run_dir / f"{settings.app_id}.ready"


def _wire(app: faust.App, rt: Runtime, spec: StageSpec, settings: Settings) -> None:
    channel = app.topic(
        *(t.name for t in spec.inputs),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    handler = HANDLERS[spec.name]
    # Bigger batches where a batch's fixed costs (commit, claims, one ClickHouse insert) dominate:
    # dispatch sat idle a third of the time between batches of 500 (bench dispatch).
    batch_size = settings.batch_size * (4 if spec.name.startswith(("feedback", "dispatch")) else 1)
    within = settings.batch_window_s * (4 if spec.name.startswith("feedback") else 1)

    async def agent(stream):
        async for events in stream.take_events(batch_size, within=within):
            await rt.wait_ready()
            await process_batch(app.producer, rt, spec, handler, events)

    agent.__name__ = f"stage_{spec.name.replace('.', '_')}"
    app.agent(channel, name=agent.__name__)(agent)


async def process_batch(producer, rt: Runtime, spec: StageSpec, handler: Handler, events) -> None:
    decode = codec(spec.value).decode
    out = Output()
    good = []
    for event in events:
        message = event.message
        try:
            good.append((message, decode(event.value, allow_json=spec.accepts_json)))
        except DecodeError as exc:
            if not spec.dead_letters:
                continue
            out.dead_letter(spec.name, message.topic, message.partition, message.offset, message.key, event.value, exc)
    if good:
        await _handle(rt, out, spec, handler, good)
    await out.flush(producer)


async def _handle(rt: Runtime, out: Output, spec: StageSpec, handler: Handler, good: list) -> None:
    values = [value for _, value in good]
    for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
        batch_out = Output()
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
        single = Output()
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

    # Topics come with their declared partitions and retention before Faust would make defaults.
    ensure_topics(settings)
    ready_file(settings).unlink(missing_ok=True)  # a previous run's
    use_fast_loop()
    app, runtime = build(settings, stages)
    worker = faust.Worker(app, runtime, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
