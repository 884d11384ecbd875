"""Redis side of the send policy: dedup + frequency caps in one atomic script per batch, shared provider
token buckets, durable deferred messages (quiet hours) and per-user preferences.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis

from connectors.state import redis_client

# (key, limit, rolling_seconds | None, ttl_s, rule) — the shape of policy.CapCheck, kept as a plain tuple so
# this module does not depend on streams.policy.
CheckTuple = tuple[str, int, int | None, int, str]
Status = Literal["admitted", "duplicate", "capped"]

_STATUS: dict[int, Status] = {0: "admitted", 1: "duplicate", 2: "capped"}

# One call decides a whole batch, request by request, in order, so later requests see what earlier ones
# counted. Layout:
#   KEYS: per request, its dedup key then one key per check.
#   ARGV[1]: now_ms (the caller's clock, so every worker and the tests agree on "now").
#   ARGV[2]: JSON, per request [message id, dedup ttl ms, [[limit, window ms (0 = a local-day SET,
#            > 0 = a rolling ZSET), key ttl ms, rule], ...]] — one argument for the batch, because
#            redis-py packing a dozen arguments per message cost more than the script (bench policy).
# Per request: an existing dedup claim → duplicate (nothing counted). Otherwise every check is evaluated
# before anything is written, so a request capped by any check counts in none (all-or-nothing). A message
# id already in a cap key passes that check without counting twice: a redelivery keeps its answer.
_ADMIT_SCRIPT = """
local now = tonumber(ARGV[1])
local requests = cjson.decode(ARGV[2])
local k = 1
local out = {}
for _, request in ipairs(requests) do
  local member = request[1]
  local dedup_ttl = request[2]
  local checks = request[3]
  local n = #checks
  local dedup_key = KEYS[k]
  local first_key = k + 1
  local status = 0
  local rule = ''
  if redis.call('EXISTS', dedup_key) == 1 then
    status = 1
  else
    for c = 0, n - 1 do
      local key = KEYS[first_key + c]
      local check = checks[c + 1]
      local limit = check[1]
      local window = check[2]
      local ok
      if window > 0 then
        -- Entries at or before now - window have left the window; pruning them is not "counting".
        redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now - window))
        ok = redis.call('ZSCORE', key, member) or redis.call('ZCARD', key) < limit
      else
        ok = redis.call('SISMEMBER', key, member) == 1 or redis.call('SCARD', key) < limit
      end
      if not ok then
        status = 2
        rule = check[4]
        break
      end
    end
    if status == 0 then
      for c = 0, n - 1 do
        local key = KEYS[first_key + c]
        local check = checks[c + 1]
        if check[2] > 0 then
          -- NX keeps the first time a message was counted, so a redelivery cannot extend its stay.
          redis.call('ZADD', key, 'NX', ARGV[1], member)
        else
          redis.call('SADD', key, member)
        end
        redis.call('PEXPIRE', key, string.format('%d', check[3]))
      end
      redis.call('SET', dedup_key, member, 'PX', string.format('%d', dedup_ttl))
    end
  end
  out[#out + 1] = status
  out[#out + 1] = rule
  k = first_key + n
end
return out
"""

# A token bucket in a hash {tokens, ts}, refilled lazily from the caller's now_ms. Time never runs
# backwards for a bucket (workers' clocks differ by a few ms): an older now refills nothing.
# Returns {granted, wait_ms}: wait_ms is 0 while a token is left, else the time until the next one.
_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1]) / 1000.0
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
end
-- The epsilon absorbs float drift (0.1 * 10 summed stepwise is not always exactly 1).
local granted = math.min(n, math.floor(tokens + 1e-9))
if granted < 0 then granted = 0 end
tokens = tokens - granted
local wait = 0
if tokens < 1 - 1e-9 then
  wait = math.ceil((1 - tokens) / rate - 1e-9)
  if wait < 1 then wait = 1 end
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.9f', tokens), 'ts', string.format('%.0f', ts))
-- Once full again the bucket is the same as no bucket, so it need not outlive the refill time.
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate) + 1000)
return {granted, wait}
"""

# Drops re-produced deferred messages, but only those still due: a payload deferred again meanwhile
# (same bytes, later release time) must not be lost.
_DROP_DUE_SCRIPT = """
local due_by = tonumber(ARGV[1])
local removed = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= due_by then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""


# Durable delay queues (sorted sets by release time): quiet-hours deferrals go back to the throttle,
# provider retries back to dispatch, fallback checks fire a channel fallback if no receipt came.
DEFERRED = "deferred"
RETRIES = "retries"
FALLBACK_CHECKS = "fallback-checks"


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """One message's policy question: may it go, given its dedup claim and every cap it counts in?"""

    message_id: str
    dedup_key: str
    dedup_ttl_s: int
    checks: Sequence[CheckTuple] = field(default_factory=tuple)
    now_ms: int = 0


@dataclass(frozen=True, slots=True)
class Admission:
    status: Status
    rule: str | None = None


class PolicyStore:
    """`prefix` namespaces the keys this store names itself (deferred set, preferences, buckets); dedup and
    cap keys come whole from the caller (streams.policy builds them) and are used as given."""

    def __init__(self, url: str, prefix: str = "") -> None:
        self.redis = redis_client(url)
        self.prefix = prefix
        self._admit = self.redis.register_script(_ADMIT_SCRIPT)
        self._bucket = self.redis.register_script(_BUCKET_SCRIPT)
        self._drop_due = self.redis.register_script(_DROP_DUE_SCRIPT)

    async def close(self) -> None:
        await self.redis.aclose()

    def prefs_key(self, user_id: str) -> str:
        return f"{self.prefix}prefs:{user_id}"

    def bucket_key(self, bucket: str) -> str:
        return f"{self.prefix}bucket:{bucket}"

    # Dedup and caps ------------------------------------------------------------------------
    async def admit(self, requests: Sequence[AdmitRequest]) -> list[Admission]:
        """Decide a batch in one atomic script call (one round trip); one Admission per request, in order.

        The script takes a single "now": the batch is decided at the latest now_ms among its requests, so
        a batch never counts against a window that has already moved on for one of its members.
        """
        if not requests:
            return []
        keys: list[str] = []
        batch: list[Any] = []
        for r in requests:
            keys.append(r.dedup_key)
            checks = []
            for key, limit, rolling_s, ttl_s, rule in r.checks:
                keys.append(key)
                checks.append([limit, (rolling_s or 0) * 1000, max(1, ttl_s) * 1000, rule])
            batch.append([r.message_id, max(1, r.dedup_ttl_s) * 1000, checks])
        now_ms = max(r.now_ms for r in requests)
        raw = await self._admit(keys=keys, args=[now_ms, orjson.dumps(batch)])
        return [
            Admission(_STATUS[int(raw[i])], raw[i + 1].decode() if raw[i + 1] else None) for i in range(0, len(raw), 2)
        ]

    async def release_dedup(self, dedup_keys: Sequence[str]) -> None:
        """Give back dedup claims of messages that failed permanently BEFORE reaching the provider (invalid
        address rejected locally, render error, circuit open and given up), so a corrected retry can go.

        Never for a send the provider may have accepted (timeouts, 5xx after the request left): releasing
        then risks a double send, which dedup exists to prevent. Caps are deliberately not released: a
        retry with the SAME message id passes them again without counting twice; a new id counts anew.
        """
        if dedup_keys:
            await self.redis.delete(*dedup_keys)

    # Provider rate limits ------------------------------------------------------------------
    async def take_tokens(self, bucket: str, rate_per_s: float, burst: int, n: int, now_ms: int) -> tuple[int, int]:
        """Take up to n tokens from a bucket shared by every worker → (granted, wait_ms to the next token).

        A throttled caller sends what was granted and waits wait_ms for the rest; it is never failed.
        """
        granted, wait_ms = await self._bucket(
            keys=[self.bucket_key(bucket)], args=[repr(float(rate_per_s)), burst, n, now_ms]
        )
        return int(granted), int(wait_ms)

    # Deferred messages (quiet hours) -------------------------------------------------------
    def queue_key(self, queue: str) -> str:
        return f"{self.prefix}{queue}"

    async def defer(self, items: Sequence[tuple[int, bytes]], queue: str = DEFERRED) -> None:
        """items: (release_at_ms, encoded message). Redis (AOF in production) keeps them across restarts.

        Members are the payload bytes, so deferring the same message twice keeps one entry (the later time).
        """
        if items:
            await self.redis.zadd(self.queue_key(queue), {payload: release_at for release_at, payload in items})

    async def due(self, now_ms: int, limit: int = 1000, queue: str = DEFERRED) -> list[bytes]:
        """Peek (not pop) payloads due by now_ms, earliest first: at-least-once is peek → produce → drop.

        Run one releasing loop per deployment (or accept duplicates, which dedup turns into 'duplicate').
        """
        return await self.redis.zrangebyscore(self.queue_key(queue), "-inf", now_ms, start=0, num=limit)

    async def drop_due(self, payloads: Sequence[bytes], due_by_ms: int | None = None, queue: str = DEFERRED) -> None:
        """Remove payloads after they were safely re-produced.

        With due_by_ms (the now_ms given to due()), a payload deferred again meanwhile to a later time is kept.
        """
        if not payloads:
            return
        if due_by_ms is None:
            await self.redis.zrem(self.queue_key(queue), *payloads)
        else:
            await self._drop_due(keys=[self.queue_key(queue)], args=[due_by_ms, *payloads])

    async def deferred_count(self, queue: str = DEFERRED) -> int:
        return int(await self.redis.zcard(self.queue_key(queue)))

    # Preferences and unsubscribes ----------------------------------------------------------
    async def preferences(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        if not user_ids:
            return []
        raw = await self.redis.mget([self.prefs_key(u) for u in user_ids])
        return [json.loads(r) if r else None for r in raw]

    async def put_preferences(self, user_id: str, prefs: dict[str, Any]) -> None:
        await self.redis.set(self.prefs_key(user_id), json.dumps(prefs, ensure_ascii=False, default=str))


async def bench_admit(url: str, messages: int, batch: int, users: int = 2000) -> float:
    """Admitted+capped decisions per second: batches of `batch` requests, 2 checks each (a daily SET cap of
    3 and a rolling 7-day ZSET cap of 5), one script call per batch, over `users` users so about half the
    messages are capped. Keys live under a random prefix and are removed afterwards."""
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    store = PolicyStore(url, prefix=prefix)
    now_ms = int(time.time() * 1000)
    requests = [
        AdmitRequest(
            message_id=f"m{i}",
            dedup_key=f"{prefix}dedup:m{i}",
            dedup_ttl_s=600,
            checks=(
                (f"{prefix}cap:day:u{i % users}", 3, None, 600, "daily"),
                (f"{prefix}cap:7d:u{i % users}", 5, 7 * 24 * 3600, 600, "weekly"),
            ),
            now_ms=now_ms,
        )
        for i in range(messages)
    ]
    decided = 0
    try:
        await store.admit(requests[:1])  # loads the script, so the timing is of EVALSHA only
        start = time.perf_counter()
        for i in range(1, messages, batch):
            decided += len(await store.admit(requests[i : i + batch]))
        elapsed = time.perf_counter() - start
    finally:
        async for keys in _scan_batches(store.redis, f"{prefix}*"):
            await store.redis.unlink(*keys)
        await store.close()
    return decided / elapsed


async def _scan_batches(redis: aioredis.Redis, match: str, count: int = 1000):
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=match, count=count):
        batch.append(key)
        if len(batch) >= count:
            yield batch
            batch = []
    if batch:
        yield batch


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:16379/0"
    for size in (100, 500, 1000):
        rate = asyncio.run(bench_admit(target, 50_000, size))
        print(f"batch {size:5d}: {rate:,.0f} decisions/s ({2 * rate:,.0f} cap checks/s)")
