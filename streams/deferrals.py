"""The release loop for deferred messages: when quiet hours end, a deferred message goes back to
loopcast.rendered, where the throttle judges it again (it may expire, or be capped, then).

One loop per deployment (it runs in the worker that owns the warehouse): two would re-produce the
same messages, which dedup would absorb but which would cost work. Peek → produce → drop: at least
once, never lost.
"""

from __future__ import annotations

import asyncio
import logging

from infra import topics
from schemas.contracts import codec
from schemas.models import RenderedMessage, now_utc

log = logging.getLogger("loopcast.deferrals")
rendered = codec(RenderedMessage)


class DeferralLoop:
    def __init__(self, rt, interval_s: float = 1.0) -> None:
        self.rt = rt
        self.interval_s = interval_s

    async def run(self) -> None:
        while True:
            try:
                await self.release_due()
            except Exception:  # outlive a Redis or Kafka blip; the messages stay in Redis
                log.exception("releasing deferred messages failed; retrying next tick")
            await asyncio.sleep(self.interval_s)  # a schedule, not synchronisation

    async def release_due(self) -> int:
        released = 0
        now_ms = int(now_utc().timestamp() * 1000)
        while due := await self.rt.policy.due(now_ms):
            futures = [
                await self.rt.producer.send(topics.RENDERED.name, raw, key=rendered.decode(raw).user_id.encode())
                for raw in due
            ]
            await asyncio.gather(*futures)
            await self.rt.policy.drop_due(due, due_by_ms=now_ms)
            released += len(due)
        if released:
            log.info("released %d deferred messages", released)
        return released
