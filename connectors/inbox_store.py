"""The in-app inbox in Redis: per user a sorted set of message ids (newest first, capped), a set of
the unread ones, and a hash per message. Keys share the user in a {hash tag}, so one user's inbox
lives in one Redis Cluster slot and every change is one atomic script.

    inbox:{<user>}:list      ZSET  message id → created_at (ms)
    inbox:{<user>}:unread    SET   message ids not read yet
    inbox:{<user>}:m:<id>    HASH  title, body, link, image_url, extra, campaign_id, created_at, read
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis.asyncio as redis
from pydantic import BaseModel

DEFAULT_CAP = 500

# KEYS: list, unread, message hash; ARGV: id, created_at, cap, then field/value pairs.
# A message already stored is left alone (a redelivery must not mark a read message unread again).
_ADD = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[3], 'created_at', ARGV[2], 'read', '0', unpack(fields))
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if excess > 0 then
  local prefix = string.sub(KEYS[3], 1, #KEYS[3] - #ARGV[1])
  for _, old in ipairs(redis.call('ZRANGE', KEYS[1], 0, excess - 1)) do
    redis.call('DEL', prefix .. old)
    redis.call('SREM', KEYS[2], old)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
end
return 1
"""

# KEYS: unread; ARGV: message-hash prefix, then ids (none: every unread one). Returns how many changed.
_MARK_READ = """
local ids = ARGV
local first = 2
if #ARGV == 1 then ids = redis.call('SMEMBERS', KEYS[1]); first = 1 end
local changed = 0
for i = first, #ids do
  if redis.call('SREM', KEYS[1], ids[i]) == 1 then
    redis.call('HSET', ARGV[1] .. ids[i], 'read', '1')
    changed = changed + 1
  end
end
return changed
"""


class InboxItem(BaseModel):
    message_id: str
    title: str | None = None
    body: str
    link: str | None = None
    image_url: str | None = None
    extra: str | None = None  # the copy engine's JSON extras (e.g. {"cta": "Shop now"})
    campaign_id: str | None = None
    created_at: int  # ms since the epoch
    read: bool = False


class InboxStore:
    """One user's inbox at a time; every method is a single round trip (a script or a pipeline)."""

    def __init__(self, url: str, *, cap: int = DEFAULT_CAP, client: redis.Redis | None = None) -> None:
        if cap < 1:
            raise ValueError("the inbox cap must be at least 1")
        self.cap = cap
        self.redis = client or redis.Redis.from_url(url, decode_responses=True)
        self._add = self.redis.register_script(_ADD)
        self._mark_read = self.redis.register_script(_MARK_READ)

    @staticmethod
    def _keys(user_id: str) -> tuple[str, str, str]:
        base = f"inbox:{{{user_id}}}"
        return f"{base}:list", f"{base}:unread", f"{base}:m:"

    async def add(
        self,
        user_id: str,
        message_id: str,
        *,
        body: str,
        title: str | None = None,
        link: str | None = None,
        image_url: str | None = None,
        extra: str | None = None,
        campaign_id: str | None = None,
        created_at: int | None = None,
    ) -> bool:
        """Store a message, newest first, dropping the oldest beyond the cap. False if it was already there."""
        listing, unread, prefix = self._keys(user_id)
        fields = {
            "body": body,
            "title": title,
            "link": link,
            "image_url": image_url,
            "extra": extra,
            "campaign_id": campaign_id,
        }
        pairs = [item for name, value in fields.items() if value is not None for item in (name, value)]
        stamp = created_at if created_at is not None else int(time.time() * 1000)
        added = await self._add(keys=[listing, unread, prefix + message_id], args=[message_id, stamp, self.cap, *pairs])
        return bool(added)

    async def list(self, user_id: str, limit: int = 50, before: str | None = None) -> list[InboxItem]:
        """Newest first. `before` is the message id that ended the previous page (exclusive); a cursor
        that was trimmed away meanwhile yields an empty page."""
        listing, _, prefix = self._keys(user_id)
        start = 0
        if before is not None:
            rank = await self.redis.zrevrank(listing, before)
            if rank is None:
                return []
            start = rank + 1
        ids = await self.redis.zrevrange(listing, start, start + max(limit, 1) - 1)
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id in ids:
                pipe.hgetall(prefix + message_id)
            rows = await pipe.execute()
        return [
            InboxItem(
                message_id=message_id,
                **{k: v for k, v in row.items() if k not in ("read", "created_at")},
                created_at=int(row["created_at"]),
                read=row.get("read") == "1",
            )
            for message_id, row in zip(ids, rows, strict=True)
            if row  # trimmed between the two reads
        ]

    async def unread_count(self, user_id: str) -> int:
        return await self.redis.scard(self._keys(user_id)[1])

    async def mark_read(self, user_id: str, message_ids: Iterable[str] | None = None) -> int:
        """Mark the given messages (None: all) read; returns how many were unread before."""
        _, unread, prefix = self._keys(user_id)
        ids = [] if message_ids is None else list(message_ids)
        if message_ids is not None and not ids:
            return 0
        return int(await self._mark_read(keys=[unread], args=[prefix, *ids]))

    async def close(self) -> None:
        await self.redis.aclose()
