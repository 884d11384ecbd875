"""Feishu/Lark custom bot webhook with signature verification on: the body carries a timestamp (seconds)
and base64(HMAC-SHA256 keyed by "<timestamp>\\n<secret>" over an empty message) - the secret is in the
key, not the message. Errors arrive as {"code": n, "msg": ...}; a bot takes 100 requests a minute, 5 a second.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    DeliveryResult,
    HttpAdapter,
    Limits,
    accepted,
    message_extra,
    rejected,
    root_url,
)
from schemas.config import Channel
from schemas.models import RenderedMessage

API_ROOT = "https://open.feishu.cn"
THROTTLED = {11232}  # frequency limited
MAX_SKEW_S = 3600
REQUEST_MAX = 20 * 1024  # a custom bot's request body (a card alone may be 30 KB through the app API)


def sign(secret: str, timestamp: int | str) -> str:
    return base64.b64encode(hmac.new(f"{timestamp}\n{secret}".encode(), b"", hashlib.sha256).digest()).decode()


def verify(secret: str, timestamp: Any, signature: Any, *, now: float | None = None) -> bool:
    try:
        stamp = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - stamp) > MAX_SKEW_S:
        return False
    return isinstance(signature, str) and hmac.compare_digest(sign(secret, stamp), signature)


def throttled(code: int, msg: str) -> bool:
    # 9499 is Feishu's generic "Bad Request"; it means throttling only when it says "too many request".
    return code in THROTTLED or (code == 9499 and "too many" in msg.lower())


class FeishuAdapter(HttpAdapter):
    """The bot posts to its own group, so the address is not used; the hook id and signing secret are
    credentials. No options."""

    scheme = "feishu"
    channel_kind = "im"
    limits = Limits(body_maxlen=REQUEST_MAX, title_maxlen=256, rate_per_s=100 / 60)
    returns_provider_ids = False
    sends_receipts = False

    class Credentials(BaseModel):
        hook_id: SecretStr = SecretStr("loopcast-dev-feishu-hook")
        secret: SecretStr = SecretStr("loopcast-dev-feishu-secret")

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        self.root = root_url(channel, API_ROOT)

    def payload(self, message: RenderedMessage, now: int | None = None) -> dict[str, Any]:
        stamp = now if now is not None else int(time.time())
        secret = self.credentials.secret.get_secret_value()
        body: dict[str, Any] = {"timestamp": str(stamp), "sign": sign(secret, stamp)}
        card = message_extra(message).get("card")
        if isinstance(card, dict):
            return {**body, "msg_type": "interactive", "card": card}
        text = "\n\n".join(p for p in (message.title, message.body, message.link) if p)
        return {**body, "msg_type": "text", "content": {"text": text}}

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = json.dumps(self.payload(message), ensure_ascii=False).encode()
        url = f"{self.root}/open-apis/bot/v2/hook/{self.credentials.hook_id.get_secret_value()}"
        response = await self.request("POST", url, data=body, headers={"Content-Type": "application/json"})
        if isinstance(response, DeliveryResult):
            return response
        try:
            answer = response.json()
            code = int(answer["code"] if "code" in answer else answer["StatusCode"])
            msg = str(answer.get("msg") or answer.get("StatusMessage") or "")
        except (ValueError, KeyError, TypeError, AttributeError):
            return response.unreadable()
        if code == 0:
            return accepted(None, response.text) if response.ok else response.failure()
        retry = throttled(code, msg) or response.status == 429 or response.status >= 500
        return rejected(str(code), response.text, retryable=retry, retry_after=response.retry_after)
