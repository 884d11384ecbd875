"""Slack Web API chat.postMessage with a bot token: Slack answers HTTP 200 with {"ok": false, "error": …}
for business errors and 429 + Retry-After when rate limited (about one message a second per channel).
A message is identified by its channel and `ts`, so the provider id is "channel:ts".
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    DeliveryResult,
    HttpAdapter,
    Limits,
    accepted,
    malformed,
    message_extra,
    rejected,
    root_url,
)
from schemas.config import Channel
from schemas.models import RenderedMessage

API_ROOT = "https://slack.com"
RETRYABLE = {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}


class SlackAdapter(HttpAdapter):
    """Options: `channel` - post every message there (an id like C0123 or #name); without it the message's
    address is the conversation (a channel id, or a user id for a DM from the bot)."""

    scheme = "slack"
    channel_kind = "im"
    limits = Limits(body_maxlen=40_000, title_maxlen=150, rate_per_s=1)
    returns_provider_ids = True
    sends_receipts = False

    class Credentials(BaseModel):
        token: SecretStr = SecretStr("xoxb-loopcast-dev-token")

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        self.url = root_url(channel, API_ROOT) + "/api/chat.postMessage"

    def payload(self, message: RenderedMessage) -> dict[str, Any]:
        extra = message_extra(message)
        blocks = extra.get("blocks") if isinstance(extra.get("blocks"), list) else None
        # With blocks, `text` is only the notification fallback; without, it is the message.
        text = message.body if blocks else "\n\n".join(p for p in (message.title, message.body) if p)
        body: dict[str, Any] = {
            "channel": self.channel.options.get("channel") or message.address,
            "text": text[:40_000],
            "unfurl_links": False,
        }
        if blocks:
            body["blocks"] = blocks
        return body

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = json.dumps(self.payload(message), ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Authorization": f"Bearer {self.credentials.token.get_secret_value()}",
        }
        response = await self.request("POST", self.url, data=body, headers=headers)
        if isinstance(response, DeliveryResult):
            return response
        text = response.text
        try:
            answer = json.loads(text)
            ok, error = bool(answer["ok"]), answer.get("error")
        except (ValueError, KeyError, TypeError):
            return response.unreadable()
        if not response.ok:
            return response.failure(code=error if isinstance(error, str) else None)
        if not ok:
            return rejected(str(error or "unknown_error"), text, retryable=error in RETRYABLE)
        try:
            return accepted(f"{answer['channel']}:{answer['ts']}", text)
        except KeyError:
            return malformed(text)
