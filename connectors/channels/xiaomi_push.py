"""Xiaomi Mi Push server API v3: a form POST per registration id with `Authorization: key=<AppSecret>`; business
errors arrive as {"result": "error", "code": ...} and the message id in data.id is what receipts refer to.

Receipts go to the per-message `extra.callback` URL and Xiaomi does not sign them, so that URL carries a
secret token in its query string, checked on arrival. callback.type 17 asks for "delivered" (1) and
"invalid target" (16) only: clicks are tracked by our own links.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    DeliveryResult,
    HttpAdapter,
    Limits,
    Receipt,
    ReceiptRejected,
    ReceiptRequest,
    accepted,
    malformed,
    query_value,
    rejected,
    require_secret,
    root_url,
)
from schemas.config import Channel
from schemas.models import RenderedMessage

XMPUSH_API = "https://api.xmpush.xiaomi.com"
CALLBACK_TYPE = "17"  # 1 delivered + 16 target invalid
DELIVERED, CLICKED = 1, 2
# System errors and "API called too often" are worth retrying; the rest (auth 21301, bad package 22022,
# invalid params 10017, the daily quota 10034 …) are not, at least not today.
RETRYABLE = {1, 10001, 10002, 10003, 10027, 26003, 65029}
MAX_PAYLOAD_BYTES = 4096


def with_token(url: str, token: str) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=query + urlencode({"token": token})))


class XiaomiPushAdapter(HttpAdapter):
    """Options: `package_name` (required: restricted_package_name), `callback_url` (where Xiaomi posts
    receipts; default the credentials' callback_url, i.e. Loopcast's /receipts/xiaomi-push), `channel_id`
    (the Android notification channel registered with Xiaomi), `notify_type` (default -1: sound, vibration and
    light), `ttl_s` (time_to_live)."""

    scheme = "xiaomi-push"
    channel_kind = "push"
    # streams/copy/channels.py RULES push-xiaomi (title < 50, description < 128); payload cap checked in send().
    limits = Limits(title_maxlen=49, body_maxlen=127)
    returns_provider_ids = True
    sends_receipts = True
    push_vendor = "xiaomi"

    class Credentials(BaseModel):
        app_secret: SecretStr = SecretStr("loopcast-dev-xiaomi-secret")
        # Put in the callback URL's query: the only thing that tells our receipts from anyone's POST.
        receipt_token: SecretStr = SecretStr("loopcast-dev-xiaomi-receipt")
        # Loopcast's public receipt URL for Xiaomi (not a secret; here because it derives from settings).
        callback_url: str = ""

    @classmethod
    def credentials_from(cls, settings) -> Credentials:
        credentials = cls.Credentials.model_validate(settings.providers.get(cls.settings_key(), {}))
        if credentials.callback_url:
            return credentials
        return credentials.model_copy(update={"callback_url": f"{settings.http_base}/receipts/{cls.scheme}"})

    @classmethod
    def parse_receipts(cls, credentials: Credentials, request: ReceiptRequest) -> list[Receipt]:
        expected = credentials.receipt_token.get_secret_value()
        require_secret(query_value(request, "token"), expected, reason="callback token does not match")
        try:
            form = parse_qs(request.body.decode(), strict_parsing=True)
            data = json.loads(form["data"][0])
            receipts = []
            for msg_id, report in data.items():
                kind = int(report["type"])
                if kind == CLICKED:
                    continue  # a click, not a delivery report
                receipts.append(
                    Receipt(
                        provider_message_id=str(msg_id),
                        delivered=kind == DELIVERED,
                        error_code=None if kind == DELIVERED else f"type_{kind}",
                    )
                )
            return receipts
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ReceiptRejected(f"malformed receipt: {exc!r}") from None

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        self.package_name = channel.options.get("package_name")
        if not self.package_name:
            raise ValueError(f"channel {channel.id!r}: xiaomi-push needs options.package_name")
        root = root_url(channel, XMPUSH_API)
        self.url = f"{root}/v3/message/regid"
        callback = channel.options.get("callback_url") or credentials.callback_url
        self.callback = with_token(callback, credentials.receipt_token.get_secret_value()) if callback else None
        self.channel_id = channel.options.get("channel_id")
        self.notify_type = channel.options.get("notify_type", "-1")
        self.ttl_s = channel.options.get("ttl_s")

    def form(self, message: RenderedMessage) -> dict[str, str]:
        payload = json.dumps({"message_id": message.message_id, "link": message.link}, separators=(",", ":"))
        form: dict[str, Any] = {
            "registration_id": message.address,
            "title": message.title or "",
            "description": message.body,
            "payload": payload,
            "restricted_package_name": self.package_name,
            "notify_type": self.notify_type,
            "pass_through": "0",
        }
        if message.link:
            form["extra.notify_effect"] = "3"  # open the web page
            form["extra.web_uri"] = message.link
        else:
            form["extra.notify_effect"] = "1"  # open the app's launcher activity
        if self.channel_id:
            form["extra.channel_id"] = self.channel_id
        if self.ttl_s:
            form["time_to_live"] = str(int(self.ttl_s) * 1000)
        if self.callback:
            form["extra.callback"] = self.callback
            form["extra.callback.param"] = message.message_id
            form["extra.callback.type"] = CALLBACK_TYPE
        return form

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        form = self.form(message)
        size = len(form["title"].encode()) + len(form["description"].encode()) + len(form["payload"].encode())
        if size > MAX_PAYLOAD_BYTES:
            return rejected("payload_too_large", f"{size} bytes")
        headers = {"Authorization": f"key={self.credentials.app_secret.get_secret_value()}"}
        response = await self.request("POST", self.url, data=form, headers=headers)
        if isinstance(response, DeliveryResult):
            return response
        text, status = response.text, response.status
        try:
            answer = json.loads(text)
            code = int(answer["code"])
        except (ValueError, KeyError, TypeError):
            return response.unreadable()
        if code == 0 and answer.get("result") == "ok":
            msg_id = (answer.get("data") or {}).get("id")
            return accepted(str(msg_id), text) if msg_id else malformed(text)
        retry = code in RETRYABLE or status == 429 or status >= 500
        return rejected(str(code), text, retryable=retry, retry_after=response.retry_after)
