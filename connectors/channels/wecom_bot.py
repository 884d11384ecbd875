"""WeCom (企业微信) group robot: a webhook keyed by `key`, posting markdown (or text) into one group chat.
No message ids and no receipts; WeCom answers HTTP 200 with an `errcode` even for errors, and throttles
each robot at 20 messages a minute (45009).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    ChannelAdapter,
    DeliveryResult,
    Limits,
    accepted,
    http_failure,
    malformed,
    rejected,
    transport_failure,
)
from schemas.config import Channel
from schemas.models import RenderedMessage
from streams.copy.channels import truncate

API_ROOT = "https://qyapi.weixin.qq.com"
RETRYABLE = {-1, 45009}  # system busy, api freq out of limit
MARKDOWN_FORMATS = {"wecom", "dingtalk", "slack", "telegram"}


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


class WecomBotAdapter(ChannelAdapter):
    """The robot posts to its own group, so the message's address is not used. No options."""

    scheme = "wecom-bot"
    channel_kind = "im"
    # markdown content 4096 bytes (text 2048); 20 messages a minute per robot.
    limits = Limits(body_maxlen=4096, rate_per_s=20 / 60)
    returns_provider_ids = False
    sends_receipts = False

    class Credentials(BaseModel):
        key: SecretStr = SecretStr("loopcast-dev-wecom-bot-key")

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        self.url = (str(channel.url).rstrip("/") if channel.url else API_ROOT) + "/cgi-bin/webhook/send"
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=channel.timeout_s),
            connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
        )

    def payload(self, message: RenderedMessage) -> dict[str, Any]:
        if self.channel.format in MARKDOWN_FORMATS:
            return {"msgtype": "markdown", "markdown": {"content": truncate(message.body, 4096, unit="bytes")}}
        text = "\n\n".join(p for p in (message.title, message.body, message.link) if p)
        return {"msgtype": "text", "text": {"content": truncate(text, 2048, unit="bytes")}}

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = json.dumps(self.payload(message), ensure_ascii=False).encode()
        params = {"key": self.credentials.key.get_secret_value()}
        try:
            async with self.session.post(
                self.url, params=params, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                text, status, retry_after = await response.text(), response.status, response.headers.get("Retry-After")
        except (TimeoutError, aiohttp.ClientError) as exc:
            return transport_failure(exc)
        if not 200 <= status < 300:
            return http_failure(status, text, retry_after)
        try:
            code = int(json.loads(text)["errcode"])
        except (ValueError, KeyError, TypeError):
            return malformed(text)
        if code == 0:
            return accepted(None, text)
        result = rejected(str(code), text, retryable=code in RETRYABLE)
        if code in RETRYABLE and _seconds(retry_after) is not None:
            result = result.model_copy(update={"retry_after_s": _seconds(retry_after)})
        return result

    async def close(self) -> None:
        await self.session.close()
