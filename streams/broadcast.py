"""Broadcast: one campaign to every member of a segment, fanned out into loopcast.matched in chunks
with a Redis checkpoint, so a crashed run resumes where Kafka last acknowledged — no gaps, and the
few messages re-sent carry the same deterministic ids, which the throttle deduplicates."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Literal

from aiokafka import AIOKafkaProducer
from pydantic import BaseModel
from pyroaring import BitMap

from connectors.audience_store import AudienceStore, segment_bitmap_key
from connectors.kafka import send_keyed
from infra import topics
from infra.settings import Settings
from schemas.config import Campaign
from schemas.contracts import encode
from schemas.models import MatchedMessage, now_utc
from streams.match import message_id

EVENT_TYPE = "broadcast"

Progress = Callable[[int, int], None]


def meta_key(broadcast_id: str) -> str:
    return f"broadcast:{broadcast_id}"


def cursor_key(broadcast_id: str) -> str:
    return f"broadcast:{broadcast_id}:cursor"


def members_key(broadcast_id: str) -> str:
    return f"broadcast:{broadcast_id}:members"


# Creates the broadcast once: its campaign, segment, start time and a snapshot of the members, so a
# resumed run targets the same audience at the same instant even if the segment moved meanwhile.
OPEN = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'campaign_id', ARGV[1], 'segment_id', ARGV[2], 'started_at', ARGV[3],
           'status', 'running', 'acked', 0)
redis.call('SET', KEYS[2], ARGV[4])
return 1
"""


class BroadcastError(RuntimeError):
    pass


class BroadcastState(BaseModel):
    broadcast_id: str
    campaign_id: str
    segment_id: str
    started_at: datetime
    status: Literal["running", "done"]
    # The last member int whose message Kafka acknowledged; None before the first chunk.
    cursor: int | None = None
    acked: int = 0
    finished_at: datetime | None = None


class BroadcastReport(BaseModel):
    broadcast_id: str
    campaign_id: str
    segment_id: str
    members: int
    # Messages acknowledged by Kafka in this run.
    produced: int
    # The checkpoint this run started after (None: a fresh start), and the members it covered.
    resumed_from: int | None = None
    already_sent: int = 0
    # Member ints without a string id in the id map (never expected; skipped, not retried).
    missing: int = 0
    done: bool = False
    # The broadcast had already finished before this run: nothing was produced.
    was_done: bool = False
    started_at: datetime
    seconds: float
    # produced / seconds.
    rate: float


# Pure parts ------------------------------------------------------------------------------------
def event_id_for(broadcast_id: str) -> str:
    return f"broadcast:{broadcast_id}"


def chunks(members: BitMap, after: int | None, size: int) -> Iterator[list[int]]:
    """The members above `after` (all of them when None), ascending, `size` at a time."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    chunk: list[int] = []
    for n in members if after is None else members.iter_equal_or_larger(after + 1):
        chunk.append(n)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_messages(
    campaign: Campaign, broadcast_id: str, segment_id: str, user_ids: Sequence[str], triggered_at: datetime
) -> list[MatchedMessage]:
    """One matched message per user. Everything but the user comes from the broadcast itself, so a
    resumed run rebuilds byte-identical messages with the same ids."""
    event_id = event_id_for(broadcast_id)
    base = MatchedMessage(
        message_id="-",
        campaign_id=campaign.id,
        user_id="-",
        event_id=event_id,
        event_type=EVENT_TYPE,
        channel=campaign.channel,
        priority=campaign.priority,
        triggered_at=triggered_at,
        properties={"broadcast_id": broadcast_id, "segment_id": segment_id},
    )
    return [
        base.model_copy(
            update={"user_id": user_id, "message_id": message_id(campaign.id, user_id, event_id, campaign.channel)}
        )
        for user_id in user_ids
    ]


# The checkpoint ----------------------------------------------------------------------------------
async def broadcast_state(store: AudienceStore, broadcast_id: str) -> BroadcastState | None:
    pipe = store.redis.pipeline(transaction=True)
    pipe.hgetall(meta_key(broadcast_id))
    pipe.get(cursor_key(broadcast_id))
    meta, cursor = await pipe.execute()
    if not meta:
        return None
    fields = {k.decode(): v.decode() for k, v in meta.items()}
    return BroadcastState(broadcast_id=broadcast_id, cursor=int(cursor) if cursor is not None else None, **fields)


async def open_broadcast(
    store: AudienceStore, campaign: Campaign, segment_id: str, broadcast_id: str
) -> tuple[BroadcastState, BitMap]:
    """The broadcast's state and member snapshot, creating both on the first call."""
    if await broadcast_state(store, broadcast_id) is None:
        if not await store.redis.exists(segment_bitmap_key(segment_id)):
            raise BroadcastError(f"segment {segment_id!r} has no member bitmap: compute it first")
        snapshot = await store.bitmap(segment_id)
        await store.redis.eval(
            OPEN,
            2,
            meta_key(broadcast_id),
            members_key(broadcast_id),
            campaign.id,
            segment_id,
            now_utc().isoformat(),
            snapshot.serialize(),
        )
    state = await broadcast_state(store, broadcast_id)
    assert state is not None
    if (state.campaign_id, state.segment_id) != (campaign.id, segment_id):
        raise BroadcastError(
            f"broadcast {broadcast_id!r} belongs to campaign {state.campaign_id!r} and segment "
            f"{state.segment_id!r}: choose another broadcast id"
        )
    raw = await store.redis.get(members_key(broadcast_id))
    return state, BitMap.deserialize(raw) if raw else BitMap()


# The fan-out -----------------------------------------------------------------------------------
async def broadcast(
    store: AudienceStore,
    producer: AIOKafkaProducer,
    campaign: Campaign,
    segment_id: str,
    broadcast_id: str,
    *,
    chunk: int = 5000,
    in_flight: int = 2,
    progress: Progress | None = None,
) -> BroadcastReport:
    """Produce the campaign's message for every segment member not yet acknowledged, in ascending
    member-int order. At most `in_flight` chunks are unacknowledged at any moment, which bounds both
    memory and what a crash makes the next run re-send."""
    if campaign.status != "active":
        raise BroadcastError(f"campaign {campaign.id!r} is {campaign.status}")
    if in_flight < 1:
        raise ValueError("in_flight must be at least 1")
    clock = time.perf_counter()
    state, members = await open_broadcast(store, campaign, segment_id, broadcast_id)
    already = members.rank(state.cursor) if state.cursor is not None else 0

    def report(produced: int, missing: int, done: bool, was_done: bool = False) -> BroadcastReport:
        seconds = time.perf_counter() - clock
        return BroadcastReport(
            broadcast_id=broadcast_id,
            campaign_id=campaign.id,
            segment_id=segment_id,
            members=len(members),
            produced=produced,
            resumed_from=state.cursor,
            already_sent=already,
            missing=missing,
            done=done,
            was_done=was_done,
            started_at=state.started_at,
            seconds=seconds,
            rate=produced / seconds if seconds > 0 else 0.0,
        )

    if state.status == "done":
        return report(0, 0, done=True, was_done=True)

    total = len(members)
    acked_members = already
    produced = missing = 0
    # (last member int, members covered, Kafka's acknowledgement of the chunk's messages)
    pending: deque[tuple[int, int, asyncio.Future]] = deque()

    async def settle_oldest() -> None:
        nonlocal acked_members, produced
        last, covered, acks = pending.popleft()
        produced += len(await acks)
        pipe = store.redis.pipeline(transaction=True)
        pipe.set(cursor_key(broadcast_id), last)
        pipe.hincrby(meta_key(broadcast_id), "acked", covered)
        await pipe.execute()
        acked_members += covered
        if progress:
            progress(acked_members, total)

    try:
        for ints in chunks(members, state.cursor, chunk):
            user_ids = await store.user_ids_for(ints)
            found = [u for u in user_ids if u is not None]
            missing += len(user_ids) - len(found)
            messages = build_messages(campaign, broadcast_id, segment_id, found, state.started_at)
            records = [(m.user_id.encode(), encode(m)) for m in messages]
            sends = await send_keyed(producer, topics.MATCHED.name, records)
            pending.append((ints[-1], len(ints), asyncio.ensure_future(_count_acked(sends, len(records)))))
            while len(pending) >= in_flight:
                await settle_oldest()
        while pending:
            await settle_oldest()
    finally:
        for _, _, acks in pending:
            acks.cancel()
    await store.redis.hset(meta_key(broadcast_id), mapping={"status": "done", "finished_at": now_utc().isoformat()})
    return report(produced, missing, done=True)


async def _count_acked(acks: list[asyncio.Future], records: int) -> list[None]:
    """Resolves once every batch of the chunk is acknowledged; one entry per record (the report counts them)."""
    await asyncio.gather(*acks)
    return [None] * records


async def run_broadcast(
    settings: Settings,
    campaign: Campaign,
    segment_id: str,
    broadcast_id: str,
    *,
    chunk: int = 5000,
    in_flight: int = 2,
    progress: Progress | None = None,
) -> BroadcastReport:
    """`broadcast` with its own store and producer (for the CLI and one-off scripts)."""
    store = AudienceStore(settings.redis)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        return await broadcast(
            store, producer, campaign, segment_id, broadcast_id, chunk=chunk, in_flight=in_flight, progress=progress
        )
    finally:
        await producer.stop()
        await store.close()
