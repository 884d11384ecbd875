"""Slack incoming webhook: the secret is the URL path itself (/services/T…/B…/…), and Slack answers in
plain text - "ok" on success, an error word (invalid_payload, no_service…) with a 4xx. No message ids.
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
    root_url,
)
from schemas.config import Channel
from schemas.models import RenderedMessage

API_ROOT = "https://hooks.slack.com"


def payload(message: RenderedMessage) -> dict[str, Any]:
    """`text` is the notification and fallback; `blocks`, when the copy engine made them, are what shows."""
    extra = message_extra(message)
    text = message.body if extra.get("blocks") else "\n\n".join(p for p in (message.title, message.body) if p)
    body: dict[str, Any] = {"text": text[:40_000]}
    if isinstance(extra.get("blocks"), list):
        body["blocks"] = extra["blocks"]
    return body


class SlackWebhookAdapter(HttpAdapter):
    """The webhook posts to the channel it was created for, so the address is not used. No options."""

    scheme = "slack-webhook"
    channel_kind = "im"
    # `text` is truncated past 40,000 chars; Slack allows about one message a second per webhook.
    limits = Limits(body_maxlen=40_000, title_maxlen=150, rate_per_s=1)
    returns_provider_ids = False
    sends_receipts = False

    class Credentials(BaseModel):
        # The part of the webhook URL after /services/.
        path: SecretStr = SecretStr("T00000000/B00000000/loopcastDevWebhookSecret0")

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        self.root = root_url(channel, API_ROOT)

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = json.dumps(payload(message), ensure_ascii=False).encode()
        url = f"{self.root}/services/{self.credentials.path.get_secret_value().strip('/')}"
        answer = await self.request("POST", url, data=body, headers={"Content-Type": "application/json"})
        if isinstance(answer, DeliveryResult):
            return answer
        word = answer.text.strip()
        if not answer.ok:
            return answer.failure(code=word if word.replace("_", "").isalpha() and len(word) < 64 else None)
        return accepted(None, answer.text) if word == "ok" else malformed(answer.text)
