"""Carts and live stock against a real redis-server: order within a batch, the stock a change
replaced (and the same answer for its redelivery), carters in bounded chunks, stock and claims."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from connectors.inventory import Inventory
from connectors.state import redis_client
from streams.inventory import CartChange, StockChange
from tests.redis_server import running_redis

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with running_redis() as url:
        yield url


def run(url: str, scenario):
    async def main():
        client = redis_client(url)
        try:
            await client.flushdb()
            return await scenario(Inventory(client))
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_changes_apply_in_order_and_a_redelivery_gets_its_first_answer(redis_url) -> None:
    async def scenario(inv: Inventory):
        first = await inv.observe(
            [
                CartChange("p", "u1", True),
                StockChange("p", 30, "s0"),
                CartChange("p", "u2", True),
                CartChange("p", "u1", False),
                StockChange("p", 8, "s1"),
            ]
        )
        # The batch retried after its writes: the last change sees what it saw the first time.
        again = await inv.observe([StockChange("p", 8, "s1")])
        later = await inv.observe([StockChange("p", 0, "s2")])
        carters = [u async for chunk in inv.carters("p") for u in chunk]
        return first, again, later, carters, await inv.stocks(["p", "q", "p"])

    first, again, later, carters, stocks = run(redis_url, scenario)
    assert first == [None, 30] and again == [30] and later == [8]
    assert carters == ["u2"] and stocks == {"p": 0, "q": None}


def test_carters_come_in_bounded_chunks(redis_url) -> None:
    async def scenario(inv: Inventory):
        await inv.observe([CartChange("big", f"u{i:05d}", True) for i in range(5000)])
        return [len(chunk) async for chunk in inv.carters("big", chunk=500)]

    sizes = run(redis_url, scenario)
    assert sum(sizes) == 5000 and len(sizes) > 1 and max(sizes) < 2000


def test_stock_and_claims_in_one_read_and_claims_keep_the_first_value(redis_url) -> None:
    async def scenario(inv: Inventory):
        await inv.observe([StockChange("p", 0, "s0")])
        await inv.claim(["dedup:m1"], ["m1"], 60)
        await inv.claim(["dedup:m1", "dedup:m2"], ["other", "m2"], 60)
        read = await inv.stocks_and_claims(["p", "p"], ["dedup:m1", "dedup:m3"])
        return read, await inv.redis.get("dedup:m1")

    (stocks, claimed), kept = run(redis_url, scenario)
    assert stocks == {"p": 0} and claimed == [True, False] and kept == b"m1"
