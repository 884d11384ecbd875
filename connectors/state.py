"""Redis: user profiles, frequency caps, attribution touches and receipt correlation.

Every call here takes a whole batch and makes one round trip (a pipeline or one script), since
per-message calls cap a stage at a few thousand messages a second (STACK-NOTES).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from connectors.inventory import Inventory
from streams.match import Touch

TOUCH_TTL_S = 30 * 24 * 3600
RECEIPT_TTL_S = 7 * 24 * 3600
# Longer than any redelivery window, like the dedup claim at the throttle.
SEND_CLAIM_TTL_S = 7 * 24 * 3600
# Short links outlive the attribution window people click in.
SHORT_LINK_TTL_S = 30 * 24 * 3600
# A channel fallback waits this long at most for its message's fate (retries, receipt window).
FALLBACK_TTL_S = 2 * 24 * 3600


# One script call per batch instead of two or three commands per message: redis-py spends more
# CPU packing commands than Redis spends running them (bench dispatch).
_CLAIM_SCRIPT = """
local owner, ttl, out = ARGV[1], tonumber(ARGV[2]), {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, owner, 'NX', 'EX', ttl) or redis.call('GET', key) == owner then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
# KEYS per send: touch key, receipt key; ARGV: touch ttl, receipt ttl, then per send: campaign,
# touch JSON, receipt meta JSON ('' when the provider gave no id: no receipt will come).
_RECORD_SCRIPT = """
local touch_ttl, receipt_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
for n = 1, #KEYS / 2 do
  local a = 3 * n
  redis.call('HSET', KEYS[2 * n - 1], ARGV[a], ARGV[a + 1])
  redis.call('EXPIRE', KEYS[2 * n - 1], touch_ttl)
  if ARGV[a + 2] ~= '' then redis.call('SET', KEYS[2 * n], ARGV[a + 2], 'EX', receipt_ttl) end
end
return 1
"""


class Coalesced:
    """Many concurrent single-item calls of a batch function as one call (one Redis round trip);
    each caller still returns only once its own item was written."""

    def __init__(self, batch_fn: Callable[[list[Any]], Awaitable[None]]) -> None:
        self.batch_fn = batch_fn
        self.items: list[Any] = []
        self.flush: asyncio.Task | None = None

    async def __call__(self, item: Any) -> None:
        self.items.append(item)
        if self.flush is None:
            self.flush = asyncio.ensure_future(self._flush())
        await asyncio.shield(self.flush)  # one caller's cancellation must not cancel the others' write

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # one turn of the loop: the senders finishing now join this write
        items, self.items, self.flush = self.items, [], None
        await self.batch_fn(items)


def fallback_key(message_id: str) -> str:
    return f"fallback:{message_id}"


def profile_key(user_id: str) -> str:
    return f"profile:{user_id}"


def touch_key(user_id: str) -> str:
    return f"touch:{user_id}"


def redis_client(url: str, max_connections: int = 64) -> aioredis.Redis:
    """A client whose callers wait for a free connection instead of failing: under load a burst of
    receipts and sends must queue, not turn into errors that make a batch retry."""
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=30)
    return aioredis.Redis(connection_pool=pool)


def send_claim_key(message_id: str) -> str:
    return f"sent:{message_id}"


def receipt_key(provider: str, provider_message_id: str) -> str:
    return f"receipt:{provider}:{provider_message_id}"


def short_link_key(code: str) -> str:
    return f"link:{code}"


def ab_key(campaign_id: str) -> str:
    return f"ab:state:{campaign_id}"


def held_key(campaign_id: str) -> str:
    return f"ab:held:{campaign_id}"


class State:
    def __init__(self, url: str) -> None:
        self.redis = redis_client(url)
        # Identifies this process's send claims (see claim_sends).
        self.owner = uuid.uuid4().hex.encode()
        self._claim = self.redis.register_script(_CLAIM_SCRIPT)
        self._record = self.redis.register_script(_RECORD_SCRIPT)
        # Carts and live stock (the peak phase's "only N left"), on the same connections.
        self.inventory = Inventory(self.redis)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # Profiles ------------------------------------------------------------------------------
    async def profiles(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        if not user_ids:
            return []
        raw = await self.redis.mget([profile_key(u) for u in user_ids])
        return [json.loads(r) if r else None for r in raw]

    async def put_profiles(self, profiles: Iterable[dict[str, Any]]) -> int:
        pipe = self.redis.pipeline(transaction=False)
        n = 0
        for profile in profiles:
            pipe.set(profile_key(str(profile["user_id"])), json.dumps(profile, ensure_ascii=False, default=str))
            n += 1
        await pipe.execute()
        return n

    # Sends -------------------------------------------------------------------------------
    async def claim_sends(self, message_ids: Sequence[str], ttl_s: int = SEND_CLAIM_TTL_S) -> list[bool]:
        """True for each message this caller may hand to its provider; False if someone already did.

        Taken just before the send, so a worker that dies after sending but before its offset is
        committed does not send again when Kafka redelivers the message."""
        if not message_ids:
            return []
        # Ours if we just took it, or took it earlier in this process (a batch retried after a blip).
        claimed = await self._claim(keys=[send_claim_key(m) for m in message_ids], args=[self.owner, ttl_s])
        return [bool(c) for c in claimed]

    # Channel fallbacks -------------------------------------------------------------------------
    async def stash_fallbacks(self, fallbacks: Sequence[tuple[str, bytes]], ttl_s: int = FALLBACK_TTL_S) -> None:
        """(message id, the next channel's matched message, encoded), kept until the message's fate is known."""
        if fallbacks:
            pipe = self.redis.pipeline(transaction=False)
            for message_id, encoded in fallbacks:
                pipe.set(fallback_key(message_id), encoded, ex=ttl_s)
            await pipe.execute()

    async def take_fallback(self, message_id: str) -> bytes | None:
        """The stashed fallback, removed as it is read (GETDEL): of a failure, an undelivered receipt
        and an expired receipt window racing, exactly one gets it."""
        return await self.redis.getdel(fallback_key(message_id))

    async def drop_fallbacks(self, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self.redis.delete(*(fallback_key(m) for m in message_ids))

    # Attribution and receipts --------------------------------------------------------------
    async def record_sends(self, sends: Sequence[tuple[str, Touch, str | None, str | None]]) -> None:
        """sends: (user id, touch, provider, provider message id) of every accepted message."""
        keys: list[str] = []
        args: list[Any] = [TOUCH_TTL_S, RECEIPT_TTL_S]
        for user_id, touch, provider, provider_id in sends:
            with_receipt = bool(provider and provider_id)
            touch_json = touch.__pydantic_serializer__.to_json(touch)
            # The receipt's target: the touch's fields and the user's, from the one serialisation.
            meta = b'{"user_id":' + orjson.dumps(user_id) + b"," + touch_json[1:] if with_receipt else b""
            keys += [touch_key(user_id), receipt_key(provider, provider_id) if with_receipt else touch_key(user_id)]
            args += [touch.campaign_id, touch_json, meta]
        if sends:
            await self._record(keys=keys, args=args)

    async def touches(self, user_ids: Sequence[str]) -> list[dict[str, Touch]]:
        pipe = self.redis.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hgetall(touch_key(user_id))
        results = await pipe.execute()
        return [{k.decode(): Touch.model_validate_json(v) for k, v in result.items()} for result in results]

    async def put_short_links(self, links: Sequence[tuple[str, str]], ttl_s: int = SHORT_LINK_TTL_S) -> None:
        """links: (code, claims as JSON). Written before the messages that carry them are sent."""
        if links:
            pipe = self.redis.pipeline(transaction=False)
            for code, claims in links:
                pipe.set(short_link_key(code), claims, ex=ttl_s)
            await pipe.execute()

    async def short_link(self, code: str) -> str | None:
        raw = await self.redis.get(short_link_key(code))
        return raw.decode() if raw else None

    async def receipt_target(self, provider: str, provider_message_id: str) -> dict[str, Any] | None:
        [target] = await self.receipt_targets(provider, [provider_message_id])
        return target

    async def receipt_targets(self, provider: str, provider_message_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """The sends that receipts belong to, one round trip for a whole callback's receipts."""
        if not provider_message_ids:
            return []
        raw = await self.redis.mget([receipt_key(provider, i) for i in provider_message_ids])
        return [orjson.loads(r) if r else None for r in raw]

    # A/B tests ------------------------------------------------------------------------------
    async def ab_states(self, campaign_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The live decision per campaign: status, winner, bandit shares (written by the A/B loop)."""
        if not campaign_ids:
            return {}
        raw = await self.redis.mget([ab_key(c) for c in campaign_ids])
        return {c: json.loads(r) for c, r in zip(campaign_ids, raw, strict=True) if r}

    async def set_ab_state(self, campaign_id: str, state: dict[str, Any]) -> None:
        await self.redis.set(ab_key(campaign_id), json.dumps(state))

    async def hold(self, campaign_id: str, messages: Sequence[bytes]) -> None:
        """Messages waiting for a test's winner (test-then-winner: everyone outside the test share).

        Kept in Redis (AOF in production) rather than in the worker, so they survive a restart."""
        if messages:
            await self.redis.rpush(held_key(campaign_id), *messages)

    async def peek_held(self, campaign_id: str, batch: int = 1000) -> list[bytes]:
        return await self.redis.lrange(held_key(campaign_id), 0, batch - 1)

    async def drop_held(self, campaign_id: str, count: int) -> None:
        """After the peeked messages are safely in Kafka: at-least-once, never lost."""
        await self.redis.ltrim(held_key(campaign_id), count, -1)

    async def held_count(self, campaign_id: str) -> int:
        return await self.redis.llen(held_key(campaign_id))
