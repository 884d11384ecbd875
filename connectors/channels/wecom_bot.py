"""WeCom (企业微信) group robot: a webhook keyed by `key`, posting markdown (or text) into one group chat.
No message ids and no receipts; WeCom answers HTTP 200 with an `errcode` even for errors, and throttles
each robot at 20 messages a minute (45009).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    DeliveryResult,
    HttpAdapter,
    Limits,
    errcode_result,
    root_url,
)
from schemas.config import Channel
from schemas.models import RenderedMessage
from streams.copy.channels import truncate

API_ROOT = "https://qyapi.weixin.qq.com"
RETRYABLE = {-1, 45009}  # system busy, api freq out of limit
MARKDOWN_FORMATS = {"wecom", "dingtalk", "slack", "telegram"}


class WecomBotAdapter(HttpAdapter):
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
        self.url = root_url(channel, API_ROOT) + "/cgi-bin/webhook/send"

    def payload(self, message: RenderedMessage) -> dict[str, Any]:
        if self.channel.format in MARKDOWN_FORMATS:
            return {"msgtype": "markdown", "markdown": {"content": truncate(message.body, 4096, unit="bytes")}}
        text = "\n\n".join(p for p in (message.title, message.body, message.link) if p)
        return {"msgtype": "text", "text": {"content": truncate(text, 2048, unit="bytes")}}

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = json.dumps(self.payload(message), ensure_ascii=False).encode()
        params = {"key": self.credentials.key.get_secret_value()}
        headers = {"Content-Type": "application/json"}
        answer = await self.request("POST", self.url, params=params, data=body, headers=headers)
        return answer if isinstance(answer, DeliveryResult) else errcode_result(answer, RETRYABLE)
