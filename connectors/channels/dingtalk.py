"""DingTalk (钉钉) custom group robot in signing mode: every request carries a millisecond timestamp and
base64(HMAC-SHA256(secret, "<timestamp>\\n<secret>")), and DingTalk refuses timestamps over an hour old.
Business errors come back on HTTP 200 with an `errcode`; a robot takes 20 messages a minute (130101).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import quote_plus

from pydantic import BaseModel, SecretStr
from yarl import URL

from connectors.channels.base import (
    DeliveryResult,
    HttpAdapter,
    Limits,
    errcode_result,
    message_extra,
    root_url,
)
from schemas.config import Channel
from schemas.models import RenderedMessage
from streams.copy.channels import truncate

API_ROOT = "https://oapi.dingtalk.com"
RETRYABLE = {-1, 130101}  # system busy, send too fast
MAX_SKEW_MS = 3600 * 1000


def sign(secret: str, timestamp_ms: int) -> str:
    """The robot signature, base64 but not yet URL-encoded."""
    mac = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def verify(secret: str, timestamp: str | None, signature: str | None, *, now_ms: int | None = None) -> bool:
    try:
        stamp = int(timestamp or "")
    except ValueError:
        return False
    if abs((now_ms if now_ms is not None else int(time.time() * 1000)) - stamp) > MAX_SKEW_MS:
        return False
    return hmac.compare_digest(sign(secret, stamp), signature or "")


class DingtalkAdapter(HttpAdapter):
    """The robot posts to its own group, so the address is not used. Option `button_text` labels the
    actionCard button used when the message has a link (default 查看详情)."""

    scheme = "dingtalk"
    channel_kind = "im"
    limits = Limits(body_maxlen=20_000, title_maxlen=256, rate_per_s=20 / 60)
    returns_provider_ids = False
    sends_receipts = False

    class Credentials(BaseModel):
        access_token: SecretStr = SecretStr("loopcast-dev-dingtalk-token")
        secret: SecretStr = SecretStr("SECloopcast-dev-dingtalk-secret")

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        self.url = root_url(channel, API_ROOT) + "/robot/send"

    def payload(self, message: RenderedMessage) -> dict[str, Any]:
        # The title shows in the chat list and notification, not in the message itself.
        plain = message_extra(message).get("body_text") or message.body
        title = truncate(message.title or plain.split("\n", 1)[0], 256)
        text = truncate(message.body, 20_000, unit="bytes")
        if message.link:
            card = {
                "title": title,
                "text": text,
                "btnOrientation": "0",
                "singleTitle": self.channel.options.get("button_text", "查看详情"),
                "singleURL": message.link,
            }
            return {"msgtype": "actionCard", "actionCard": card}
        return {"msgtype": "markdown", "markdown": {"title": title, "text": text}}

    def signed_url(self, now_ms: int | None = None) -> URL:
        stamp = now_ms if now_ms is not None else int(time.time() * 1000)
        signature = sign(self.credentials.secret.get_secret_value(), stamp)
        token = quote_plus(self.credentials.access_token.get_secret_value())
        # Encoded by hand: the base64 '+' must reach DingTalk as %2B, not as a space.
        return URL(f"{self.url}?access_token={token}&timestamp={stamp}&sign={quote_plus(signature)}", encoded=True)

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = json.dumps(self.payload(message), ensure_ascii=False).encode()
        answer = await self.request("POST", self.signed_url(), data=body, headers={"Content-Type": "application/json"})
        return answer if isinstance(answer, DeliveryResult) else errcode_result(answer, RETRYABLE)
