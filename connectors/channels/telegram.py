"""Telegram Bot API sendMessage: the bot token is part of the URL path, so a wrong token is a 401 and an
unknown method a 404. Errors are {"ok": false, "error_code", "description"}; a 429 says how long to wait
in parameters.retry_after (not a header). A message id is unique only within its chat: "chat_id:message_id".
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
    http_failure,
    malformed,
    message_extra,
    root_url,
)
from schemas.config import Channel
from schemas.models import RenderedMessage

API_ROOT = "https://api.telegram.org"


def _code(description: str) -> str | None:
    """'Bad Request: chat not found' → 'chat_not_found', 'Unauthorized' → 'unauthorized'."""
    detail = description.split(":", 1)[-1].strip().lower()
    return "_".join(detail.split())[:64] or None


class TelegramAdapter(HttpAdapter):
    """The address is the chat id (a user's id for a private chat, or @channelusername).
    Options: `button_text` (the inline button opening the link, default "Open"); `link_preview` ("on" to let
    Telegram preview the first link; off by default)."""

    scheme = "telegram"
    channel_kind = "im"
    # Text 4096 UTF-16 units after entity parsing; about 30 messages a second per bot (1/s per chat).
    limits = Limits(body_maxlen=4096, rate_per_s=30)
    returns_provider_ids = True
    sends_receipts = False

    class Credentials(BaseModel):
        token: SecretStr = SecretStr("123456789:loopcast-dev-telegram-token")

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        self.root = root_url(channel, API_ROOT)

    def payload(self, message: RenderedMessage) -> dict[str, Any]:
        parse_mode = message_extra(message).get("parse_mode")
        # Without a parse mode the copy is plain text: the title and link go in as they are.
        text = message.body if parse_mode else "\n\n".join(p for p in (message.title, message.body) if p)
        body: dict[str, Any] = {
            "chat_id": message.address,
            "text": text,
            "link_preview_options": {"is_disabled": self.channel.options.get("link_preview") != "on"},
        }
        if parse_mode:
            body["parse_mode"] = parse_mode
        if message.link:
            button = {"text": self.channel.options.get("button_text", "Open"), "url": message.link}
            body["reply_markup"] = {"inline_keyboard": [[button]]}
        return body

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = json.dumps(self.payload(message), ensure_ascii=False).encode()
        url = f"{self.root}/bot{self.credentials.token.get_secret_value()}/sendMessage"
        response = await self.request("POST", url, data=body, headers={"Content-Type": "application/json"})
        if isinstance(response, DeliveryResult):
            return response
        text, status = response.text, response.status
        try:
            answer = json.loads(text)
            ok = bool(answer["ok"])
        except (ValueError, KeyError, TypeError):
            return response.unreadable()
        if ok and response.ok:
            try:
                result = answer["result"]
                return accepted(f"{result['chat']['id']}:{result['message_id']}", text)
            except (KeyError, TypeError):
                return malformed(text)
        try:
            code = int(answer.get("error_code") or status)
        except (TypeError, ValueError):
            code = status
        wait = (answer.get("parameters") or {}).get("retry_after")
        description = str(answer.get("description") or "")
        error_code = "too_many_requests" if code == 429 else _code(description)
        return http_failure(max(code, 400), text, str(wait) if wait else response.retry_after, code=error_code)
