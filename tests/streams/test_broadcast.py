"""Broadcast fan-out: the pure chunking and message building, then the real thing against the local
stack's Kafka and Redis — throughput, a rerun of a finished broadcast, and a SIGKILLed run resumed
with no gaps and at most one chunk sent twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer
from pyroaring import BitMap

from connectors.audience_store import AudienceStore
from connectors.kafka import partitions, read_to_end
from infra import topics
from infra.settings import Settings
from schemas.config import Campaign, Trigger
from schemas.contracts import codec, encode
from schemas.models import MatchedMessage, Priority
from streams.broadcast import (
    BroadcastError,
    BroadcastReport,
    BroadcastState,
    broadcast_state,
    build_messages,
    chunks,
    cursor_key,
    event_id_for,
    run_broadcast,
)
from streams.match import message_id

REPO = Path(__file__).resolve().parents[2]
T = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def campaign(id: str = "bc", **kw: object) -> Campaign:
    return Campaign(id=id, name=id, trigger=Trigger(event_type="broadcast"), channel="webhook", template_id="t", **kw)


# Pure parts --------------------------------------------------------------------------------------
@pytest.mark.unit
def test_chunks_walk_members_above_the_cursor_in_order() -> None:
    members = BitMap([3, 5, 8, 13, 21, 34, 55])
    assert list(chunks(members, None, 3)) == [[3, 5, 8], [13, 21, 34], [55]]
    assert list(chunks(members, 8, 3)) == [[13, 21, 34], [55]]
    assert list(chunks(members, 9, 2)) == [[13, 21], [34, 55]]
    assert list(chunks(members, 55, 3)) == [] and list(chunks(BitMap(), None, 3)) == []
    with pytest.raises(ValueError):
        list(chunks(members, None, 0))


@pytest.mark.unit
def test_messages_are_deterministic_and_carry_the_broadcast() -> None:
    c = campaign(priority=Priority.high)
    first = build_messages(c, "b1", "vip", ["u1", "u2"], T)
    again = build_messages(c, "b1", "vip", ["u2"], T)
    assert first[1] == again[0] and encode(first[1]) == encode(again[0])
    m = first[0]
    assert (m.user_id, m.event_id, m.event_type, m.channel) == ("u1", "broadcast:b1", "broadcast", "webhook")
    assert m.priority == Priority.high
    assert m.message_id == message_id("bc", "u1", "broadcast:b1", "webhook") and m.triggered_at == T
    assert m.properties == {"broadcast_id": "b1", "segment_id": "vip"}
    # The same as building it field by field (model_copy skips validation; nothing may differ).
    assert m == MatchedMessage.model_validate(m.model_dump())
    assert build_messages(c, "b2", "vip", ["u1"], T)[0].message_id != m.message_id


# Against the local stack ---------------------------------------------------------------------------
async def make_segment(settings: Settings, segment_id: str, n: int) -> list[str]:
    store = AudienceStore(settings.redis)
    try:
        user_ids = [f"{segment_id}-u{i}" for i in range(n)]
        await store.set_members(segment_id, user_ids)
        return user_ids
    finally:
        await store.close()


async def broadcast_ids(settings: Settings, broadcast_id: str) -> list[str]:
    """The message ids of this broadcast's records in loopcast.matched, repeats included."""
    decode = codec(MatchedMessage).decode
    wanted = event_id_for(broadcast_id)
    found = []
    for record in await read_to_end(settings.bootstrap, topics.MATCHED.name, timeout_s=120):
        message = decode(record.value)
        if message.event_id == wanted:
            assert record.key == message.user_id.encode()
            found.append(message.message_id)
    return found


def expected_ids(c: Campaign, broadcast_id: str, user_ids: list[str]) -> set[str]:
    return {message_id(c.id, u, event_id_for(broadcast_id), c.channel) for u in user_ids}


@pytest.mark.integration
def test_broadcast_reaches_every_member_once_and_a_rerun_sends_nothing(local_stack, stack_env: Settings) -> None:
    tag = uuid.uuid4().hex[:8]
    segment_id, broadcast_id, c = f"seg-{tag}", f"b-{tag}", campaign(f"bc-{tag}")
    user_ids = asyncio.run(make_segment(stack_env, segment_id, 100_000))
    seen: list[tuple[int, int]] = []
    report = asyncio.run(
        run_broadcast(stack_env, c, segment_id, broadcast_id, progress=lambda done, total: seen.append((done, total)))
    )
    print(f"broadcast fan-out: {report.produced:,} messages in {report.seconds:.2f}s = {report.rate:,.0f} msg/s")
    assert (report.members, report.produced, report.resumed_from, report.done) == (100_000, 100_000, None, True)
    assert seen[-1] == (100_000, 100_000) and len(seen) == 20
    again = asyncio.run(run_broadcast(stack_env, c, segment_id, broadcast_id))
    assert again.was_done and again.produced == 0
    ids = asyncio.run(broadcast_ids(stack_env, broadcast_id))
    assert len(ids) == 100_000 and set(ids) == expected_ids(c, broadcast_id, user_ids)
    # The same id for another campaign, an unknown segment, a paused campaign: refused.
    with pytest.raises(BroadcastError, match="belongs to campaign"):
        asyncio.run(run_broadcast(stack_env, campaign("other"), segment_id, broadcast_id))
    with pytest.raises(BroadcastError, match="no member bitmap"):
        asyncio.run(run_broadcast(stack_env, c, f"nope-{tag}", f"b2-{tag}"))
    with pytest.raises(BroadcastError, match="paused"):
        asyncio.run(run_broadcast(stack_env, campaign(f"bc-{tag}", status="paused"), segment_id, f"b3-{tag}"))


CHILD = """
import asyncio, sys
from infra.settings import Settings
from schemas.config import Campaign
from streams.broadcast import run_broadcast
campaign = Campaign.model_validate_json(sys.argv[1])
asyncio.run(run_broadcast(Settings(), campaign, sys.argv[2], sys.argv[3], chunk=int(sys.argv[4]), in_flight=1))
"""


async def kill_mid_chunk(child: subprocess.Popen, settings: Settings, broadcast_id: str, chunk: int) -> None:
    """SIGKILL the broadcast once two chunks are acknowledged and a quarter of the next one is already
    in Kafka but not yet checkpointed: the worst moment, whose messages the resumed run sends again."""
    store = AudienceStore(settings.redis)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        matched = await partitions(consumer, topics.MATCHED.name)
        base: tuple[int, int] | None = None  # (acked members, records in the topic) when acked last moved
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            assert child.poll() is None, f"the broadcast exited early ({child.returncode})"
            assert loop.time() < deadline, "the broadcast did not get far enough within 60s"
            acked = int(await store.redis.hget(f"broadcast:{broadcast_id}", "acked") or 0)
            written = sum((await consumer.end_offsets(matched)).values())
            if acked >= 2 * chunk:
                if base is None or base[0] != acked:
                    base = (acked, written)
                elif written - base[1] >= chunk // 4:
                    child.send_signal(signal.SIGKILL)
                    child.wait(timeout=10)
                    return
            await asyncio.sleep(0.002)
    finally:
        await consumer.stop()
        await store.close()


@pytest.mark.integration
def test_a_killed_broadcast_resumes_without_gaps_and_resends_at_most_one_chunk(
    local_stack, stack_env: Settings
) -> None:
    tag = uuid.uuid4().hex[:8]
    segment_id, broadcast_id, c = f"seg-{tag}", f"b-{tag}", campaign(f"bc-{tag}")
    chunk, n = 10_000, 200_000
    user_ids = asyncio.run(make_segment(stack_env, segment_id, n))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, c.model_dump_json(), segment_id, broadcast_id, str(chunk)],
        cwd=REPO,
        env=os.environ.copy(),
    )
    try:
        asyncio.run(kill_mid_chunk(child, stack_env, broadcast_id, chunk))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    client = redis.Redis.from_url(stack_env.redis)
    cursor = int(client.get(cursor_key(broadcast_id)))
    state = asyncio.run(_state(stack_env, broadcast_id))
    assert state.status == "running" and state.acked < n, "killed too late to test a resume"

    resumed: BroadcastReport = asyncio.run(run_broadcast(stack_env, c, segment_id, broadcast_id, chunk=chunk))
    assert resumed.resumed_from == cursor and resumed.already_sent == state.acked
    assert resumed.produced == n - state.acked and resumed.done and resumed.started_at == state.started_at

    ids = asyncio.run(broadcast_ids(stack_env, broadcast_id))
    repeats = sum(count - 1 for count in Counter(ids).values())
    print(
        f"killed after {state.acked:,} acknowledged of {n:,}; resumed: {resumed.produced:,} more "
        f"at {resumed.rate:,.0f} msg/s; {repeats} sent twice"
    )
    assert set(ids) == expected_ids(c, broadcast_id, user_ids)
    assert repeats <= chunk


async def _state(settings: Settings, broadcast_id: str) -> BroadcastState:
    store = AudienceStore(settings.redis)
    try:
        state = await broadcast_state(store, broadcast_id)
        assert state is not None
        return state
    finally:
        await store.close()


@pytest.mark.integration
def test_cli_reads_the_campaign_from_the_config_topic_or_a_file(
    local_stack, stack_env: Settings, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from connectors.kafka import produce
    from console.audience_cli import broadcast_app

    tag = uuid.uuid4().hex[:8]
    segment_id, c = f"seg-{tag}", campaign(f"bc-{tag}")
    user_ids = asyncio.run(make_segment(stack_env, segment_id, 1500))
    asyncio.run(produce(stack_env.bootstrap, topics.CONFIG.name, [(c.key, c.to_record())]))
    runner = CliRunner()
    first = runner.invoke(broadcast_app, ["start", c.id, "--segment", segment_id, "--chunk", "500"])
    assert first.exit_code == 0, first.output
    assert "1,500 messages to 1,500 members" in first.output
    again = runner.invoke(broadcast_app, ["start", c.id, "--segment", segment_id])
    assert again.exit_code == 0 and "already finished" in again.output
    status = runner.invoke(broadcast_app, ["status", f"{c.id}.{segment_id}"])
    assert '"status": "done"' in status.output and '"acked": 1500' in status.output
    from_file = tmp_path / "campaign.json"
    from_file.write_text(c.model_dump_json())
    args = ["start", c.id, "--segment", segment_id, "--id", f"file-{tag}", "--campaign-file", str(from_file)]
    assert runner.invoke(broadcast_app, args).exit_code == 0
    missing = runner.invoke(broadcast_app, ["start", f"nope-{tag}", "--segment", segment_id])
    assert missing.exit_code == 1
    ids = asyncio.run(broadcast_ids(stack_env, f"{c.id}.{segment_id}"))
    assert sorted(ids) == sorted(expected_ids(c, f"{c.id}.{segment_id}", user_ids))
