"""The release loop for everything that waits in Redis for its time: quiet-hours deferrals go back
to loopcast.rendered (the throttle judges them again: they may expire, or be capped, then);
provider retries go back to their dispatch tier; a fallback check whose message got no receipt in
time starts the campaign's next channel.

One loop per deployment (it runs in the worker that owns the warehouse): two would re-produce the
same messages, which dedup would absorb but which would cost work. Peek → produce → drop: at least
once, never lost.
"""

from __future__ import annotations

import asyncio
import logging

from connectors.policy_store import DEFERRED, FALLBACK_CHECKS, RETRIES
from infra import topics
from schemas.contracts import codec, encode
from schemas.models import RenderedMessage, now_utc

log = logging.getLogger("loopcast.deferrals")
rendered = codec(RenderedMessage)


class DeferralLoop:
    def __init__(self, rt, interval_s: float = 0.2) -> None:
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
        for queue in (DEFERRED, RETRIES, FALLBACK_CHECKS):
            released += await self._release(queue)
        return released

    async def _release(self, queue: str) -> int:
        released = 0
        now_ms = int(now_utc().timestamp() * 1000)
        while due := await self.rt.policy.due(now_ms, queue=queue):
            if queue == FALLBACK_CHECKS:
                await self._fall_back([raw.decode() for raw in due])
            else:
                futures = [await self._produce(queue, raw) for raw in due]
                await asyncio.gather(*futures)
            await self.rt.policy.drop_due(due, due_by_ms=now_ms, queue=queue)
            released += len(due)
        if released:
            log.info("released %d from %s", released, queue)
        return released

    async def _produce(self, queue: str, raw: bytes):
        message = rendered.decode(raw)
        topic = topics.RENDERED if queue == DEFERRED else topics.DISPATCH[message.priority.value]
        return await self.rt.producer.send(topic.name, raw, key=message.user_id.encode())

    async def _fall_back(self, message_ids: list[str]) -> None:
        """No receipt within the window: a delivered receipt would have removed the stash."""
        from streams.dispatch import fall_back

        sent = []

        def send(topic: str, key: str, value) -> None:
            sent.append((topic, key, value))

        for message_id in message_ids:
            await fall_back(self.rt.user_state, send, message_id)
        futures = [await self.rt.producer.send(t, encode(v), key=k.encode()) for t, k, v in sent]
        await asyncio.gather(*futures)
