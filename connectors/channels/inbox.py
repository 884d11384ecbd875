"""The in-app inbox: Loopcast itself is the provider, so a message is delivered when it is written
to the user's inbox in Redis (connectors/inbox_store.py) — no remote API, no receipts; the provider
id is our own message id, and a redelivery is a no-op rather than a second copy.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel, SecretStr
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from connectors.channels.base import (
    ChannelAdapter,
    DeliveryResult,
    Limits,
    accepted,
    rejected,
    transport_failure,
)
from connectors.inbox_store import DEFAULT_CAP, InboxStore
from schemas.config import Channel
from schemas.models import RenderedMessage


class InboxAdapter(ChannelAdapter):
    """Options: `redis_url` (default: the credentials' redis_url, i.e. the stack's Redis, settings.redis),
    `cap` (messages kept per user, default 500; the oldest go first). The inbox belongs to
    message.user_id. Redis unreachable or slow → retryable; refused auth → not retryable.
    """

    scheme = "inbox"
    channel_kind = "inbox"
    # Our own store and UI: the copy engine's inbox rules (title 200, body 20,000) are the real bounds.
    limits = Limits(title_maxlen=200, body_maxlen=20_000)
    returns_provider_ids = True
    sends_receipts = False
    delivers_on_accept = True

    class Credentials(BaseModel):
        # A URL may carry a password (redis://:pw@host/0), hence secret.
        redis_url: SecretStr | None = None

    @classmethod
    def credentials_from(cls, settings) -> Credentials:
        credentials = cls.Credentials.model_validate(settings.providers.get(cls.settings_key(), {}))
        if credentials.redis_url is None:
            credentials = credentials.model_copy(update={"redis_url": SecretStr(settings.redis)})
        return credentials

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        url = channel.options.get("redis_url") or (
            credentials.redis_url.get_secret_value() if credentials.redis_url else None
        )
        if not url:
            raise ValueError(f"channel {channel.id!r}: the inbox needs options['redis_url'] or credentials redis_url")
        try:
            cap = int(channel.options.get("cap") or DEFAULT_CAP)
        except ValueError:
            raise ValueError(f"channel {channel.id!r}: options['cap'] is not a number") from None
        self.store = InboxStore(url, cap=cap)

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        try:
            async with asyncio.timeout(self.channel.timeout_s):
                added = await self.store.add(
                    message.user_id,
                    message.message_id,
                    title=message.title,
                    body=message.body,
                    link=message.link,
                    image_url=message.image_url,
                    extra=message.extra,
                    campaign_id=message.campaign_id,
                    created_at=int(time.time() * 1000),
                )
        except AuthenticationError as exc:  # a ConnectionError subclass: check it first
            return rejected("redis_auth", repr(exc))
        except (TimeoutError, RedisTimeoutError, RedisConnectionError, OSError) as exc:
            return transport_failure(exc)
        except RedisError as exc:
            return rejected("redis_error", repr(exc), retryable=True)
        return accepted(message.message_id, "stored" if added else "already stored")

    async def close(self) -> None:
        await self.store.close()
