"""PolicyStore against the real Redis of the local stack: caps, dedup, token buckets, deferral, preferences."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from connectors.policy_store import AdmitRequest, PolicyStore
from infra.waiting import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DAY = 24 * 3600
T0 = 1_800_000_000_000  # a fixed "now" in ms; tests move time themselves


def _prefix() -> str:
    # Every test writes under its own prefix: the session's Redis is shared.
    return f"t:{uuid.uuid4().hex[:10]}:"


def _request(p: str, message_id: str, checks: list[tuple], now_ms: int = T0) -> AdmitRequest:
    return AdmitRequest(message_id, f"{p}dedup:{message_id}", DAY, checks, now_ms)


def test_daily_cap_admits_exactly_the_limit_and_dedups(local_stack, stack_env) -> None:
    p = _prefix()
    day = (f"{p}cap:day:u1", 3, None, DAY, "daily_cap")

    async def scenario():
        store = PolicyStore(stack_env.redis)
        try:
            first = await store.admit([_request(p, f"m{i}", [day]) for i in range(10)])
            again = await store.admit([_request(p, "m0", [day]), _request(p, "m9", [day])])
            return first, again, await store.redis.scard(day[0])
        finally:
            await store.close()

    first, again, counted = asyncio.run(scenario())
    assert [a.status for a in first] == ["admitted"] * 3 + ["capped"] * 7
    assert {a.rule for a in first[3:]} == {"daily_cap"} and first[0].rule is None
    # An admitted message delivered again is a duplicate; a capped one is still capped (it never claimed).
    assert [a.status for a in again] == ["duplicate", "capped"]
    assert counted == 3


def test_capped_request_counts_in_no_check_and_names_the_first_rule(local_stack, stack_env) -> None:
    p = _prefix()
    roomy = (f"{p}cap:day:campaign", 100, None, DAY, "campaign_cap")
    user = (f"{p}cap:day:user", 1, None, DAY, "user_cap")
    channel = (f"{p}cap:day:channel", 1, None, DAY, "channel_cap")

    async def scenario():
        store = PolicyStore(stack_env.redis)
        try:
            results = await store.admit(
                [
                    _request(p, "a", [roomy, user]),
                    _request(p, "b", [roomy, user]),  # fails the 2nd check: must not count in the 1st
                    _request(p, "c", [roomy, channel, user]),  # passes 2 of 3: must count in neither
                    _request(p, "e", [channel]),  # so the channel cap is still free here
                    _request(p, "d", [channel, user]),  # both full: the first listed is the rule reported
                ]
            )
            counted = [await store.redis.smembers(key) for key, *_ in (roomy, user, channel)]
            claims = await store.redis.exists(f"{p}dedup:b", f"{p}dedup:c", f"{p}dedup:d")
            return results, counted, claims
        finally:
            await store.close()

    results, counted, claims = asyncio.run(scenario())
    assert [(a.status, a.rule) for a in results] == [
        ("admitted", None),
        ("capped", "user_cap"),
        ("capped", "user_cap"),
        ("admitted", None),
        ("capped", "channel_cap"),
    ]
    assert counted == [{b"a"}, {b"a"}, {b"e"}]
    assert claims == 0  # refused requests take no dedup claim


def test_rolling_window_forgets_entries_older_than_the_window(local_stack, stack_env) -> None:
    p = _prefix()
    week = (f"{p}cap:7d:u1", 3, 7 * DAY, 8 * DAY, "weekly_cap")
    hour = 3600 * 1000

    async def scenario() -> list[str]:
        store = PolicyStore(stack_env.redis)
        try:
            timeline = [("m1", 0), ("m2", 24 * hour), ("m3", 48 * hour), ("m4", 72 * hour)]
            # m1 leaves the window at exactly 7 days after it was counted; one ms before, the cap still holds.
            timeline += [("m5", 7 * 24 * hour - 1), ("m6", 7 * 24 * hour), ("m7", 7 * 24 * hour + 1)]
            # A redelivery of m2 inside its window passes without counting twice.
            timeline += [("m2-again", 7 * 24 * hour + 2)]
            out = []
            for message_id, at in timeline:
                mid = "m2" if message_id == "m2-again" else message_id
                req = AdmitRequest(mid, f"{p}dedup:{message_id}", DAY, [week], T0 + at)
                out.append((await store.admit([req]))[0].status)
            return out
        finally:
            await store.close()

    assert asyncio.run(scenario()) == [
        "admitted",
        "admitted",
        "admitted",
        "capped",
        "capped",
        "admitted",  # m1 has left the window
        "capped",  # m2, m3, m6 fill it again
        "admitted",  # m2 is already counted: idempotent
    ]


def test_release_dedup_lets_the_same_message_retry_without_counting_twice(local_stack, stack_env) -> None:
    p = _prefix()
    day = (f"{p}cap:day:u1", 1, None, DAY, "daily_cap")

    async def scenario():
        store = PolicyStore(stack_env.redis)
        try:
            first = await store.admit([_request(p, "m1", [day])])
            await store.release_dedup([f"{p}dedup:m1"])
            retry = await store.admit([_request(p, "m1", [day]), _request(p, "m2", [day])])
            return first + retry, await store.redis.scard(day[0])
        finally:
            await store.close()

    results, counted = asyncio.run(scenario())
    assert [a.status for a in results] == ["admitted", "admitted", "capped"]
    assert counted == 1


_WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from connectors.policy_store import AdmitRequest, PolicyStore
    from infra.waiting import wait_for_async

    url, prefix, worker = sys.argv[1], sys.argv[2], sys.argv[3]

    async def main():
        store = PolicyStore(url)
        try:
            await store.redis.incr(prefix + "ready")
            # Start together, so the two processes really race.
            await wait_for_async(lambda: store.redis.exists(prefix + "go"), 20, 0.005, "the go signal")
            check = (prefix + "cap:day:u1", 5, None, 86400, "daily_cap")
            statuses = []
            for start in range(0, 200, 4):
                batch = [
                    AdmitRequest(f"{worker}-{i}", f"{prefix}dedup:{worker}-{i}", 86400, [check], 0)
                    for i in range(start, start + 4)
                ]
                statuses += [a.status for a in await store.admit(batch)]
            print(json.dumps(statuses))
        finally:
            await store.close()

    asyncio.run(main())
    """
)


def test_two_worker_processes_never_exceed_a_cap_together(local_stack, stack_env) -> None:
    import redis

    p = _prefix()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, stack_env.redis, p, f"w{w}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(2)
    ]
    client = redis.Redis.from_url(stack_env.redis)
    try:
        wait_for(lambda: int(client.get(f"{p}ready") or 0) == 2, 20, 0.02, "both workers ready")
        client.set(f"{p}go", 1)
        outputs = [proc.communicate(timeout=30) for proc in procs]
        for proc, (_, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, err
        statuses = [s for out, _ in outputs for s in json.loads(out)]
        assert len(statuses) == 400
        assert statuses.count("admitted") == 5 and statuses.count("capped") == 395
        assert client.scard(f"{p}cap:day:u1") == 5
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        client.close()


def test_token_bucket_grants_burst_plus_rate_and_tells_how_long_to_wait(local_stack, stack_env) -> None:
    async def scenario() -> tuple[int, int, int]:
        store = PolicyStore(stack_env.redis, prefix=_prefix())
        try:
            now, end, granted, calls = T0, T0 + 1000, 0, 0
            empty_wait = 0
            # A throttled caller waits the wait_ms it is told, on a simulated clock.
            while now <= end:
                got, wait_ms = await store.take_tokens("sms", 100.0, 10, 1, now)
                calls += 1
                granted += got
                if not got:
                    assert wait_ms > 0
                    empty_wait = empty_wait or wait_ms
                    now += wait_ms
            return granted, empty_wait, calls
        finally:
            await store.close()

    granted, empty_wait, calls = asyncio.run(scenario())
    assert abs(granted - 110) <= 11
    assert 0 < empty_wait <= 10  # 100/s: the next token is at most 10 ms away
    assert calls < 400


def test_token_bucket_grants_part_of_a_large_request_and_ignores_a_lagging_clock(local_stack, stack_env) -> None:
    async def scenario() -> list[tuple[int, int]]:
        store = PolicyStore(stack_env.redis, prefix=_prefix())
        try:
            return [
                await store.take_tokens("email", 10.0, 5, 8, T0),  # 5 of 8, next token in 100 ms
                await store.take_tokens("email", 10.0, 5, 1, T0 - 5000),  # a worker whose clock lags: no refill
                await store.take_tokens("email", 10.0, 5, 3, T0 + 250),  # 2.5 tokens refilled
            ]
        finally:
            await store.close()

    assert asyncio.run(scenario()) == [(5, 100), (0, 100), (2, 50)]


def test_deferred_messages_come_back_when_due_and_survive_a_new_store(local_stack, stack_env) -> None:
    p = _prefix()

    async def scenario():
        store = PolicyStore(stack_env.redis, prefix=p)
        try:
            await store.defer([(T0 + 3000, b"late"), (T0 + 1000, b"early"), (T0 + 2000, b"\x00mid\xff")])
            before = await store.due(T0 + 999)
            due = await store.due(T0 + 2000)
            limited = await store.due(T0 + 2000, limit=1)
            await store.drop_due(due)
        finally:
            await store.close()
        # A new store (a restarted worker) sees what was left.
        store = PolicyStore(stack_env.redis, prefix=p)
        try:
            left = await store.deferred_count(), await store.due(T0 + 10_000)
            # Deferred again to later while being re-produced: the guarded drop keeps it.
            await store.defer([(T0 + 20_000, b"late")])
            await store.drop_due([b"late"], due_by_ms=T0 + 10_000)
            kept = await store.deferred_count()
            await store.drop_due([b"late"], due_by_ms=T0 + 20_000)
            return before, due, limited, left, kept, await store.deferred_count()
        finally:
            await store.close()

    before, due, limited, left, kept, final = asyncio.run(scenario())
    assert before == []
    assert due == [b"early", b"\x00mid\xff"] and limited == [b"early"]
    assert left == (1, [b"late"])
    assert (kept, final) == (1, 0)


def test_preferences_round_trip(local_stack, stack_env) -> None:
    prefs = {"quiet_hours": [22, 8], "timezone": "Asia/Shanghai", "unsubscribed": ["sms"], "name": "小红"}

    async def scenario():
        store = PolicyStore(stack_env.redis, prefix=_prefix())
        try:
            await store.put_preferences("u1", prefs)
            return await store.preferences(["u1", "nobody"]), await store.preferences([])
        finally:
            await store.close()

    assert asyncio.run(scenario()) == ([prefs, None], [])
