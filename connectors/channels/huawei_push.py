"""Huawei Push Kit (HMS) server API v1: an OAuth client-credentials token (cached; renewed once on 80200003)
authorises POST /v1/{app_id}/messages:send. Answers carry a string business `code` ("80000000" = success)
that matters more than the HTTP status, and the `requestId` is what delivery receipts refer back to.

Receipts: Huawei POSTs {"statuses": [...]} to the receipt URL configured in AppGallery Connect; they are not
signed, so the callback is protected by the HTTP basic auth (user + token) Huawei lets you set on it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    Answer,
    DeliveryResult,
    HttpAdapter,
    Limits,
    Receipt,
    ReceiptRejected,
    ReceiptRequest,
    TokenCache,
    accepted,
    malformed,
    rejected,
    require_secret,
    root_url,
)
from schemas.config import Channel
from schemas.models import Priority, RenderedMessage

PUSH_API = "https://push-api.cloud.huawei.com"
OAUTH_URL = "https://oauth-login.cloud.huawei.com/oauth2/v3/token"
SUCCESS = "80000000"
TOKEN_EXPIRED = "80200003"
# Worth another try later: throttling and Huawei's own internal errors.
RETRYABLE = {"80100017", "81000001", "80600003"}
TOKEN_MARGIN_S = 300
MAX_PAYLOAD_BYTES = 4096


def basic_auth(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def business_code(answer: Answer) -> tuple[dict[str, Any] | None, str | None]:
    """The answer's JSON and its business `code`, or (None, None) when it has none."""
    try:
        body = answer.json()
        return body, str(body["code"])
    except (ValueError, KeyError, TypeError):
        return None, None


class HuaweiPushAdapter(HttpAdapter):
    """Options: `app_id` (default: the OAuth client_id, which is the app id for app-level credentials),
    `oauth_url` (default: <url>/oauth2/v3/token when a url is set, else Huawei's OAuth server), `category`
    (Huawei's message category, e.g. MARKETING or an approved self-classified one), `ttl_s`.
    A link opens in the browser (click_action type 2) when it is https, else the app opens (type 3) and
    finds the link in the message data."""

    scheme = "huawei-push"
    channel_kind = "push"
    # streams/copy/channels.py RULES push-huawei (Huawei rejects longer copy); payload cap checked in send().
    limits = Limits(title_maxlen=40, body_maxlen=80)
    returns_provider_ids = True
    sends_receipts = True
    push_vendor = "huawei"

    class Credentials(BaseModel):
        client_id: str = "100000001"
        client_secret: SecretStr = SecretStr("loopcast-dev-huawei-secret")
        # The basic auth configured on the receipt callback in AppGallery Connect.
        receipt_user: str = "huawei"
        receipt_token: SecretStr = SecretStr("loopcast-dev-huawei-receipt")

    @classmethod
    def parse_receipts(cls, credentials: Credentials, request: ReceiptRequest) -> list[Receipt]:
        given = next((v for k, v in request.headers.items() if k.lower() == "authorization"), "")
        token = credentials.receipt_token.get_secret_value()
        expected = (basic_auth(credentials.receipt_user, token), f"Bearer {token}")
        require_secret(given, *expected, reason="receipt callback authorization does not match")
        try:
            statuses = json.loads(request.body)["statuses"]
            return [
                Receipt(
                    provider_message_id=str(status["requestId"]),
                    delivered=int(status["status"]) == 0,
                    error_code=None if int(status["status"]) == 0 else str(status["status"]),
                )
                for status in statuses
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise ReceiptRejected(f"malformed receipt: {exc!r}") from None

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        root = root_url(channel, PUSH_API)
        self.app_id = channel.options.get("app_id") or credentials.client_id
        if not self.app_id:
            raise ValueError(f"channel {channel.id!r}: huawei-push needs options.app_id or a client_id")
        self.url = f"{root}/v1/{self.app_id}/messages:send"
        self.oauth_url = channel.options.get("oauth_url") or (f"{root}/oauth2/v3/token" if channel.url else OAUTH_URL)
        self.category = channel.options.get("category")
        self.ttl_s = channel.options.get("ttl_s")
        self.token = TokenCache(self._fetch_token)

    def body(self, message: RenderedMessage) -> dict[str, Any]:
        extra = json.loads(message.extra) if message.extra else {}
        if message.link and message.link.startswith("https://"):
            click: dict[str, Any] = {"type": 2, "url": message.link}
        else:
            click = {"type": 3}
        notification: dict[str, Any] = {"title": message.title, "body": message.body, "click_action": click}
        if message.image_url:
            notification["image"] = message.image_url
        if extra.get("badge") is not None:
            notification["badge"] = {"add_num": int(extra["badge"])}
        android: dict[str, Any] = {
            "urgency": "HIGH" if message.priority == Priority.high else "NORMAL",
            "bi_tag": message.message_id,  # echoed as biTag in the receipt
            "notification": notification,
        }
        if self.category:
            android["category"] = self.category
        if self.ttl_s:
            android["ttl"] = f"{int(self.ttl_s)}s"
        data = json.dumps({"message_id": message.message_id, "link": message.link}, separators=(",", ":"))
        return {"validate_only": False, "message": {"data": data, "android": android, "token": [message.address]}}

    async def _fetch_token(self) -> tuple[str, float] | DeliveryResult:
        form = {
            "grant_type": "client_credentials",
            "client_id": self.credentials.client_id,
            "client_secret": self.credentials.client_secret.get_secret_value(),
        }
        response = await self.request("POST", self.oauth_url, data=form)
        if isinstance(response, DeliveryResult):
            return response
        if response.status == 429 or response.status >= 500:
            return response.failure()
        try:
            answer = response.json()
        except ValueError:
            return malformed(response.text, retryable=True)  # nothing was sent yet
        if "access_token" not in answer:
            # A wrong client id or secret: retrying will not help.
            error = answer.get("sub_error") or answer.get("error") or response.status
            return rejected(f"oauth_{error}", response.text)
        return str(answer["access_token"]), float(answer.get("expires_in", 3600)) - TOKEN_MARGIN_S

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        payload = json.dumps(self.body(message), ensure_ascii=False, separators=(",", ":")).encode()
        if len(payload) > MAX_PAYLOAD_BYTES:
            return rejected("payload_too_large", f"{len(payload)} bytes")

        async def post(token: str) -> Answer | DeliveryResult:
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json;charset=utf-8"}
            return await self.request("POST", self.url, data=payload, headers=headers)

        def expired(response: Answer | DeliveryResult) -> bool:  # one fresh OAuth token, one retry
            return isinstance(response, Answer) and business_code(response)[1] == TOKEN_EXPIRED

        response = await self.token.call(post, expired)
        if isinstance(response, DeliveryResult):
            return response
        answer, code = business_code(response)
        if answer is None or code is None:
            return response.unreadable()
        if code == SUCCESS:
            request_id = answer.get("requestId")
            return accepted(str(request_id), response.text) if request_id else malformed(response.text)
        return rejected(code, response.text, retryable=code in RETRYABLE, retry_after=response.retry_after)
