"""Carts and live stock in Redis, for the peak phase's "only N left" pushes; every call takes a
whole batch and makes one round trip.

    carts:{product}       SET     users with the product in their cart (cart_add adds; paid or removed drops)
    stock:{product}       STRING  the product's live stock, as the last stock_changed event set it
    stock-last:{product}  HASH    that event's id and the stock it replaced: a redelivery gets the same answer
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import redis.asyncio as aioredis

from streams.inventory import CartChange, StockChange

# A cart nobody touched for this long is not a reason to message anyone.
CART_TTL_S = 30 * 24 * 3600
# Users read per SSCAN step when fanning out to a product's carters: bounded, however many there are.
CARTERS_CHUNK = 1000


def carts_key(product_id: str) -> str:
    return f"carts:{product_id}"


def stock_key(product_id: str) -> str:
    return f"stock:{product_id}"


def stock_last_key(product_id: str) -> str:
    return f"stock-last:{product_id}"


# Sets the live stock and returns the stock it replaced, atomically. The event that did it is kept
# with the answer: a batch retried after the write (a Redis blip, a crash before the Kafka commit)
# must see the same crossing again, not "no change", or the carters would never hear.
_STOCK_SCRIPT = """
local last = redis.call('HMGET', KEYS[2], 'event', 'previous')
if last[1] == ARGV[1] then
  return last[2]
end
local previous = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 'event', ARGV[1], 'previous', previous or '')
return previous
"""


def _int(raw: bytes | None) -> int | None:
    return None if raw in (None, b"") else int(raw)


class Inventory:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._set_stock = redis.register_script(_STOCK_SCRIPT)

    async def observe(self, changes: Sequence[CartChange | StockChange]) -> list[int | None]:
        """Apply cart and stock changes in order; returns, per stock change, the stock it replaced
        (read and written atomically; a redelivered change gets its first answer again)."""
        if not changes:
            return []
        pipe = self.redis.pipeline(transaction=False)
        stock_at: list[int] = []
        for change in changes:
            if isinstance(change, StockChange):
                stock_at.append(len(pipe.command_stack))
                keys = [stock_key(change.product_id), stock_last_key(change.product_id)]
                await self._set_stock(keys=keys, args=[change.event_id, change.stock], client=pipe)
            else:
                key = carts_key(change.product_id)
                if change.in_cart:
                    pipe.sadd(key, change.user_id)
                    pipe.expire(key, CART_TTL_S)
                else:
                    pipe.srem(key, change.user_id)
        results = await pipe.execute()
        return [_int(results[i]) for i in stock_at]

    async def carters(self, product_id: str, chunk: int = CARTERS_CHUNK) -> AsyncIterator[list[str]]:
        """The product's carters, about `chunk` at a time (SSCAN: a user added or removed meanwhile
        may or may not be seen; none present throughout is missed)."""
        cursor = 0
        while True:
            cursor, users = await self.redis.sscan(carts_key(product_id), cursor, count=chunk)
            if users:
                yield sorted(u.decode() for u in users)
            if cursor == 0:
                return

    async def stocks(self, product_ids: Sequence[str]) -> dict[str, int | None]:
        """Live stock per product (None: never reported), one MGET."""
        return (await self.stocks_and_claims(product_ids, ()))[0]

    async def stocks_and_claims(
        self, product_ids: Sequence[str], claim_keys: Sequence[str]
    ) -> tuple[dict[str, int | None], list[bool]]:
        """Live stock per product and whether each claim key (a dedup key) exists, in one MGET."""
        products = list(dict.fromkeys(product_ids))
        if not products and not claim_keys:
            return {}, []
        raw = await self.redis.mget([stock_key(p) for p in products] + list(claim_keys))
        stocks = {p: _int(r) for p, r in zip(products, raw, strict=False)}
        return stocks, [r is not None for r in raw[len(products) :]]

    async def claim(self, keys: Sequence[str], values: Sequence[str], ttl_s: int) -> None:
        """Record final verdicts (SET NX, so an earlier claim keeps its value)."""
        if keys:
            pipe = self.redis.pipeline(transaction=False)
            for key, value in zip(keys, values, strict=True):
                pipe.set(key, value, nx=True, ex=ttl_s)
            await pipe.execute()
