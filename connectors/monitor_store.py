"""Redis side of the delivery-rate monitor: outcome counts in time buckets shared by every worker,
and each subject's open alert, taken with SET NX and released with GETDEL so one alert fires once.

Keys are under the worker's app id: one consumer group counts each outcome once.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis

from infra.settings import MonitorSettings
from streams.monitor import OpenAlert, Subject, Tally, Windows, subject_name

# An alert nobody closed (its subject went quiet) is forgotten after a day, so it may fire again.
OPEN_TTL_S = 24 * 3600


def bucket_key(app_id: str, bucket: int) -> str:
    return f"monitor:{app_id}:bucket:{bucket}"


def open_key(app_id: str, subject: Subject) -> str:
    return f"monitor:{app_id}:open:{subject_name(subject)}"


class MonitorStore:
    def __init__(self, redis: aioredis.Redis, app_id: str, cfg: MonitorSettings) -> None:
        self.redis = redis
        self.app_id = app_id
        # A bucket outlives the longest span that reads it.
        self.ttl_s = int((max(cfg.window_s + cfg.baseline_s, cfg.recover_s) + 2 * cfg.bucket_s) * 1.5) + 1

    async def add_and_read(
        self, counts: Mapping[Subject, Mapping[int, Tally]], span: Windows
    ) -> tuple[dict[Subject, dict[int, Tally]], dict[Subject, OpenAlert]]:
        """Add a batch's counts, then read back every bucket of the span and the open alerts of the
        batch's subjects: one pipelined round trip. A hash per bucket, two fields per subject."""
        subjects = sorted(counts)
        pipe = self.redis.pipeline(transaction=False)
        touched: set[int] = set()
        for subject in subjects:
            name = subject_name(subject)
            for bucket, t in counts[subject].items():
                key = bucket_key(self.app_id, bucket)
                if t.ok:
                    pipe.hincrby(key, f"{name}:ok", t.ok)
                if t.bad:
                    pipe.hincrby(key, f"{name}:bad", t.bad)
                touched.add(bucket)
        for bucket in touched:
            pipe.expire(bucket_key(self.app_id, bucket), self.ttl_s)
        fields = [f"{subject_name(s)}:{part}" for s in subjects for part in ("ok", "bad")]
        read = range(span.oldest, span.now + 1)
        for bucket in read:
            pipe.hmget(bucket_key(self.app_id, bucket), fields)
        pipe.mget([open_key(self.app_id, s) for s in subjects])
        replies = await pipe.execute()
        states = replies[-1]
        seen: dict[Subject, dict[int, Tally]] = {s: {} for s in subjects}
        for bucket, values in zip(read, replies[-1 - len(read) : -1], strict=True):
            for i, subject in enumerate(subjects):
                ok, bad = int(values[2 * i] or 0), int(values[2 * i + 1] or 0)
                if ok or bad:
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
