"""WeCom (企业微信) application messages: an access token from corpid + corpsecret, cached for its
`expires_in` and fetched again once when a send says it is invalid (40014) or expired (42001).
WeCom answers HTTP 200 for business errors, so the `errcode` in the body decides, not the status.
"""

from __future__ import annotations

import asyncio
import json
import time
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
TOKEN_ERRORS = {40014, 42001}  # invalid / expired access_token: fetch a new one, retry once
RETRYABLE = {-1, 45009, 45033}  # system busy, api freq out of limit, too many concurrent calls
MARKDOWN_FORMATS = {"wecom", "dingtalk", "slack", "telegram"}


def _extra(message: RenderedMessage) -> dict[str, Any]:
    try:
        extra = json.loads(message.extra) if message.extra else {}
    except ValueError:
        return {}
    return extra if isinstance(extra, dict) else {}


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _bytes(text: str, limit: int) -> str:
    return truncate(text, limit, unit="bytes")


class WecomAppAdapter(ChannelAdapter):
    """Options: `agent_id` (required, the application's AgentId); `button_text` (textcard button, default 详情)."""

    scheme = "wecom-app"
    channel_kind = "im"
    # Application text and markdown content: 2048 bytes (the group robot's markdown allows 4096).
    limits = Limits(body_maxlen=2048, title_maxlen=128, rate_per_s=None)
    returns_provider_ids = True
    sends_receipts = False

    class Credentials(BaseModel):
        corp_id: str = "ww-loopcast-dev"
        corp_secret: SecretStr = SecretStr("loopcast-dev-wecom-secret")

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        agent_id = channel.options.get("agent_id")
        if not agent_id or not agent_id.isdigit():
            raise ValueError(f"channel {channel.id!r}: wecom-app needs options.agent_id (the numeric AgentId)")
        self.agent_id = int(agent_id)
        self.root = str(channel.url).rstrip("/") if channel.url else API_ROOT
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=channel.timeout_s),
            connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
        )
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()

    def payload(self, message: RenderedMessage) -> dict[str, Any]:
        body: dict[str, Any] = {"touser": message.address, "agentid": self.agent_id}
        plain = _extra(message).get("body_text") or message.body
        title = _bytes(message.title or plain.split("\n", 1)[0], 128)
        if message.link and message.image_url:
            article = {"title": title, "description": _bytes(plain, 512), "url": message.link}
            body.update(msgtype="news", news={"articles": [{**article, "picurl": message.image_url}]})
        elif message.link:
            card = {
                "title": title,
                "description": _bytes(plain, 512),
                "url": message.link,
                "btntxt": self.channel.options.get("button_text", "详情"),
            }
            body.update(msgtype="textcard", textcard=card)
        elif self.channel.format in MARKDOWN_FORMATS:
            body.update(msgtype="markdown", markdown={"content": _bytes(message.body, 2048)})
        else:
            body.update(msgtype="text", text={"content": _bytes(message.body, 2048)})
        return body

    async def _fetch_token(self) -> str | DeliveryResult:
        params = {"corpid": self.credentials.corp_id, "corpsecret": self.credentials.corp_secret.get_secret_value()}
        async with self.session.get(f"{self.root}/cgi-bin/gettoken", params=params) as response:
            text, status, retry_after = await response.text(), response.status, response.headers.get("Retry-After")
        if not 200 <= status < 300:
            return http_failure(status, text, retry_after)
        try:
            answer = json.loads(text)
            code = int(answer.get("errcode", 0))
            if code:
                return rejected(str(code), text, retryable=code in RETRYABLE)
            self._token = str(answer["access_token"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return malformed(text, retryable=True)  # nothing was sent yet
        # Refresh a minute early so a token never expires between our check and WeCom's.
        self._token_expires = time.monotonic() + max(int(answer.get("expires_in", 7200)) - 60, 1)
        return self._token

    async def _access_token(self, stale: str | None = None) -> str | DeliveryResult:
        async with self._token_lock:
            if self._token and self._token != stale and time.monotonic() < self._token_expires:
                return self._token
            return await self._fetch_token()

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = json.dumps(self.payload(message), ensure_ascii=False).encode()
        stale: str | None = None
        try:
            for _ in range(2):
                token = await self._access_token(stale)
                if isinstance(token, DeliveryResult):
                    return token
                url = f"{self.root}/cgi-bin/message/send"
                headers = {"Content-Type": "application/json"}
                async with self.session.post(url, params={"access_token": token}, data=body, headers=headers) as r:
                    text, status, retry_after = await r.text(), r.status, r.headers.get("Retry-After")
                result = self._result(message, status, text, retry_after)
                if result.error_code not in {str(c) for c in TOKEN_ERRORS}:
                    return result
                stale = token
            return result
        except (TimeoutError, aiohttp.ClientError) as exc:
            return transport_failure(exc)

    def _result(self, message: RenderedMessage, status: int, text: str, retry_after: str | None) -> DeliveryResult:
        if not 200 <= status < 300:
            return http_failure(status, text, retry_after)
        try:
            answer = json.loads(text)
            code = int(answer["errcode"])
        except (ValueError, KeyError, TypeError):
            return malformed(text)
        if code:
            result = rejected(str(code), text, retryable=code in RETRYABLE)
            if code in RETRYABLE and _seconds(retry_after) is not None:
                result = result.model_copy(update={"retry_after_s": _seconds(retry_after)})
            return result
        # errcode 0 can still name our one recipient as invalid (unknown user or outside the app's visibility).
        if message.address in str(answer.get("invaliduser") or "").split("|"):
            return rejected("invaliduser", text)
        return accepted(str(answer.get("msgid") or "") or None, text)

    async def close(self) -> None:
        await self.session.close()
