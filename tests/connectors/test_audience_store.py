"""The audience store against a real redis-server of its own: the id map (and its race), segment
bitmaps and their algebra and cache, packages."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from pyroaring import BitMap

from connectors.audience_store import UNIVERSE, AudienceStore, Expr
from tests.redis_server import running_redis

pytestmark = pytest.mark.integration

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A private redis-server, without persistence, stopped after the module."""
    with running_redis() as url:
        yield url


def run(url: str, scenario: Callable[[AudienceStore], Awaitable[T]]) -> T:
    """Runs a scenario on an empty database with a store of its own."""
    redis.Redis.from_url(url).flushdb()

    async def main() -> T:
        store = AudienceStore(url)
        try:
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())


# The id map --------------------------------------------------------------------------------------
def test_ids_are_dense_stable_and_map_back(redis_url: str) -> None:
    async def scenario(store: AudienceStore) -> None:
        first = await store.ids_for(["a", "b", "a", "c"])
        again = await store.ids_for(["c", "b", "d"])
        lookup = await store.ids_for(["a", "zz", "d"], create=False)
        assert first == [0, 1, 0, 2] and again == [2, 1, 3] and lookup == [0, None, 3]
        assert await store.user_ids_for([3, 0, 99]) == ["d", "a", None]
        assert await store.known_users() == 4
        assert await store.universe() == BitMap(range(4))
        # Ids beyond one script batch keep their order.
        many = [f"m{i}" for i in range(25_000)]
        ints = await store.ids_for(many)
        assert ints == list(range(4, 25_004)) and await store.user_ids_for(ints) == many

    run(redis_url, scenario)


def test_racing_tasks_never_give_a_user_two_ints(redis_url: str) -> None:
    """Two clients (own connections) map overlapping ids, shuffled, in small interleaved batches."""

    async def scenario(store: AudienceStore) -> None:
        other = AudienceStore(redis_url)
        ids = [f"user-{i}" for i in range(6000)]

        async def map_all(s: AudienceStore, seed: int) -> dict[str, int]:
            mine = ids[:4000] if seed == 1 else ids[2000:]
            mine = random.Random(seed).sample(mine, len(mine))
            found: dict[str, int] = {}
            for start in range(0, len(mine), 50):
                batch = mine[start : start + 50]
                found |= dict(zip(batch, await s.ids_for(batch), strict=True))
            return found

        try:
            left, right = await asyncio.gather(map_all(store, 1), map_all(other, 2))
        finally:
            await other.close()
        shared = set(left) & set(right)
        assert len(shared) == 2000 and all(left[u] == right[u] for u in shared)
        merged = left | right
        assert sorted(merged.values()) == list(range(6000)) and await store.known_users() == 6000

    run(redis_url, scenario)


RACER = """
import asyncio, sys
from connectors.audience_store import AudienceStore

async def main():
    store = AudienceStore(sys.argv[1])
    ids = [f"p-{i}" for i in range(int(sys.argv[2]), int(sys.argv[3]))][::int(sys.argv[4])]
    out = []
    for start in range(0, len(ids), 100):
        out += await store.ids_for(ids[start:start + 100])
    await store.close()
    print("\\n".join(f"{u} {n}" for u, n in zip(ids, out)))
asyncio.run(main())
"""


def test_racing_processes_never_give_a_user_two_ints(redis_url: str) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    # One walks 0..20000 upwards, the other 10000..30000 downwards: they meet in the shared half.
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, redis_url, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for args in (("0", "20000", "1"), ("10000", "30000", "-1"))
    ]
    outputs = [dict(line.split() for line in r.communicate(timeout=120)[0].splitlines()) for r in racers]
    assert all(r.returncode == 0 for r in racers)
    left, right = outputs
    shared = set(left) & set(right)
    assert len(shared) == 10_000 and all(left[u] == right[u] for u in shared)
    assert sorted(int(n) for n in (left | right).values()) == list(range(30_000))


# Bitmaps and expressions -------------------------------------------------------------------------
def test_expressions_over_segments_packages_and_the_universe(redis_url: str) -> None:
    async def scenario(store: AudienceStore) -> None:
        await store.ids_for([f"u{i}" for i in range(10)])
        assert await store.set_members("even", [f"u{i}" for i in range(0, 10, 2)]) == 5
        await store.put_bitmap("low", BitMap(range(5)))
        await store.put_package("pk", ["u9", "u8", "new-user"])
        assert await store.bitmap("even") == BitMap([0, 2, 4, 6, 8])
        assert await store.combine(("and", "even", "low")) == BitMap([0, 2, 4])
        assert await store.combine(("or", "even", "low")) == BitMap([0, 1, 2, 3, 4, 6, 8])
        # NOT is relative to every known user, the package's new user (int 10) included.
        assert await store.combine(("not", "even")) == BitMap([1, 3, 5, 7, 9, 10])
        as_dicts = {"op": "and", "args": [{"op": "segment", "id": "even"}, {"op": "not", "args": ["low"]}]}
        assert await store.combine(Expr.model_validate(as_dicts)) == BitMap([6, 8])
        mixed = ("or", ("package", "pk"), ("and", "low", ("not", "even")))
        assert await store.combine(mixed) == BitMap([1, 3, 8, 9, 10])
        assert await store.size(("and", "even", ("not", "low"))) == 2
        assert await store.size(("and", "even", "low", ("not", ("package", "pk")))) == 3
        assert await store.size("missing-segment") == 0
        # combine hands out a copy: changing it leaves the cached bitmap alone.
        copy = await store.combine("even")
        copy.add(1)
        assert await store.size("even") == 5

    run(redis_url, scenario)


@pytest.mark.parametrize(
    "bad",
    [{"op": "segment"}, {"op": "not", "args": []}, {"op": "and", "id": "x"}, ("segment", "a", "b"), ("xor", "a")],
)
def test_malformed_expressions_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        Expr.parse(bad)  # type: ignore[arg-type]


def test_cache_refetches_only_bitmaps_whose_version_moved(redis_url: str) -> None:
    async def scenario(store: AudienceStore) -> None:
        other = AudienceStore(redis_url)
        try:
            await store.put_bitmap("s", BitMap([1, 2, 3]))
            first = await store.bitmap("s")
            assert await store.bitmap("s") is first
            # A write from another process bumps the version: the next read sees it.
            await other.put_bitmap("s", BitMap([7]))
            assert await store.bitmap("s") == BitMap([7])
            universe = await store.universe()
            await other.ids_for(["fresh"])
            assert len(await store.universe()) == len(universe) + 1
            assert await store.redis.hget("bitmap:versions", UNIVERSE) is not None
        finally:
            await other.close()

    run(redis_url, scenario)


def test_sizes_of_two_million_member_segments(redis_url: str) -> None:
    """Sizes of AND/OR over two 1M-member segments (out of 4M users): cold (fetch) and warm (cache)."""

    async def scenario(store: AudienceStore) -> dict[str, float]:
        rng = random.Random(7)
        a = BitMap(rng.sample(range(4_000_000), 1_000_000))
        b = BitMap(rng.sample(range(4_000_000), 1_000_000))
        await store.put_bitmap("a", a)
        await store.put_bitmap("b", b)
        times: dict[str, float] = {}
        for label, expr, expected in (("and", ("and", "a", "b"), len(a & b)), ("or", ("or", "a", "b"), len(a | b))):
            reader = AudienceStore(redis_url)
            try:
                for phase in ("cold", "warm", "warm again"):
                    started = time.perf_counter()
                    assert await reader.size(expr) == expected
                    times[f"{label} {phase}"] = (time.perf_counter() - started) * 1000
            finally:
                await reader.close()
        started = time.perf_counter()
        assert len(await store.combine(("and", "a", "b"))) == len(a & b)
        times["and combine (cached)"] = (time.perf_counter() - started) * 1000
        return times

    times = run(redis_url, scenario)
    print("bitmap size (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    assert times["and warm"] < 100 and times["or warm"] < 100
    assert times["and cold"] < 1000 and times["or cold"] < 1000


# Packages ----------------------------------------------------------------------------------------
def test_packages_replace_check_membership_and_size(redis_url: str) -> None:
    async def scenario(store: AudienceStore) -> None:
        assert await store.put_package("p", ["a", "b", "c", "b"]) == 3
        assert await store.in_package("p", ["a", "x", "c"]) == [True, False, True]
        assert await store.package_size("p") == 3
        assert await store.put_package("p", ["x"]) == 1
        assert await store.in_package("p", ["a", "x"]) == [False, True]
        ints = await store.ids_for(["x"])
        assert await store.package_bitmap("p") == BitMap(ints)
        assert await store.size(("package", "p")) == 1
        assert await store.put_package("p", []) == 0
        assert await store.package_size("p") == 0 and await store.in_package("p", ["x"]) == [False]
        many = [f"m{i}" for i in range(30_000)]
        await store.put_package("big", many)
        flags = await store.in_package("big", [*many[::1000], "nobody"])
        assert flags == [True] * 30 + [False]
        # No staging key is left behind.
        assert [k async for k in store.redis.scan_iter("package:*:staging:*")] == []

    run(redis_url, scenario)
