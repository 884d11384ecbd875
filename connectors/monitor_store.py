"""Redis side of the delivery-rate monitor: outcome counts in time buckets shared by every worker,
and each subject's open alert, taken with SET NX and released with GETDEL so one alert fires once.

Keys are under the worker's app id: one consumer group counts each outcome once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import redis.asyncio as aioredis

from infra.settings import MonitorSettings
from streams.monitor import OpenAlert, Subject, Tally, Windows, subject_name

# An alert nobody closed (its subject went quiet) is forgotten after a day, so it may fire again.
OPEN_TTL_S = 24 * 3600


# One call per batch: add the batch's counts, then read every bucket of the span and the open alerts.
#   KEYS: the span's bucket keys, oldest first, then the batch's subjects' open-alert keys.
#   ARGV[1]: bucket ttl s; ARGV[2]: how many bucket keys; ARGV[3]: JSON [[bucket offset, field, n], ...];
#   ARGV[4..]: the fields to read ("<subject>:ok", "<subject>:bad", ...).
# Returns {flat [bucket offset, field index, count, ...] for the non-empty ones, [open alert JSON or '']}.
_ADD_AND_READ = """
local ttl, buckets = tonumber(ARGV[1]), tonumber(ARGV[2])
for _, inc in ipairs(cjson.decode(ARGV[3])) do
  local key = KEYS[inc[1] + 1]
  redis.call('HINCRBY', key, inc[2], inc[3])
  redis.call('EXPIRE', key, ttl)
end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
local counts = {}
for b = 1, buckets do
  local values = redis.call('HMGET', KEYS[b], unpack(fields))
  for f = 1, #fields do
    if values[f] then
      counts[#counts + 1] = b - 1
      counts[#counts + 1] = f - 1
      counts[#counts + 1] = tonumber(values[f])
    end
  end
end
local states = {}
for k = buckets + 1, #KEYS do states[#states + 1] = redis.call('GET', KEYS[k]) or '' end
return {counts, states}
"""


# The app id in braces is a Redis Cluster hash tag: one script call touches keys of a single slot.
def bucket_key(app_id: str, bucket: int) -> str:
    return f"monitor:{{{app_id}}}:bucket:{bucket}"


def open_key(app_id: str, subject: Subject) -> str:
    return f"monitor:{{{app_id}}}:open:{subject_name(subject)}"


class MonitorStore:
    def __init__(self, redis: aioredis.Redis, app_id: str, cfg: MonitorSettings) -> None:
        self.redis = redis
        self.app_id = app_id
        # A bucket outlives the longest span that reads it.
        self.ttl_s = int((max(cfg.window_s + cfg.baseline_s, cfg.recover_s) + 2 * cfg.bucket_s) * 1.5) + 1
        self._add_and_read = redis.register_script(_ADD_AND_READ)

    async def add_and_read(
        self, counts: Mapping[Subject, Mapping[int, Tally]], span: Windows
    ) -> tuple[dict[Subject, dict[int, Tally]], dict[Subject, OpenAlert]]:
        """Add a batch's counts (buckets within the span), then read back every bucket of the span and
        the open alerts of the batch's subjects: one script call. A hash per bucket, two fields per subject."""
        subjects = sorted(counts)
        read = range(span.oldest, span.now + 1)
        fields = [f"{subject_name(s)}:{part}" for s in subjects for part in ("ok", "bad")]
        increments = [
            [bucket - read.start, f"{subject_name(s)}:{part}", n]
            for s in subjects
            for bucket, t in counts[s].items()
            for part, n in (("ok", t.ok), ("bad", t.bad))
            if n
        ]
        keys = [bucket_key(self.app_id, b) for b in read] + [open_key(self.app_id, s) for s in subjects]
        flat, states = await self._add_and_read(
            keys=keys, args=[self.ttl_s, len(read), json.dumps(increments, separators=(",", ":")), *fields]
        )
        parts: dict[tuple[Subject, int], list[int]] = {}
        for i in range(0, len(flat), 3):
            offset, field, n = int(flat[i]), int(flat[i + 1]), int(flat[i + 2])
            parts.setdefault((subjects[field // 2], read.start + offset), [0, 0])[field % 2] = n
        seen: dict[Subject, dict[int, Tally]] = {s: {} for s in subjects}
        for (subject, bucket), (ok, bad) in parts.items():
            seen[subject][bucket] = Tally(ok, bad)
        opened = {s: OpenAlert.model_validate_json(raw) for s, raw in zip(subjects, states, strict=True) if raw}
        return seen, opened

    async def open(self, subject: Subject, state: OpenAlert) -> bool:
        """Open the subject's alert unless one is open: True for the one worker that did."""
        key = open_key(self.app_id, subject)
        return bool(await self.redis.set(key, state.model_dump_json(), nx=True, ex=OPEN_TTL_S))

    async def close(self, subject: Subject) -> bool:
        """Close the subject's alert: True for the one worker that took it away."""
        return await self.redis.getdel(open_key(self.app_id, subject)) is not None
