"""Twilio Programmable Messaging: form-encoded POST with HTTP Basic auth. Status callbacks are signed with
X-Twilio-Signature (HMAC-SHA1 over the exact callback URL plus the sorted form fields), so we verify against the
URL as received; they also report intermediate states (queued, sent), and only final ones become receipts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    DeliveryResult,
    HttpAdapter,
    Limits,
    Receipt,
    ReceiptRejected,
    ReceiptRequest,
    accepted,
    bad_signature,
    malformed,
    root_url,
)
from schemas.config import Channel
from schemas.models import RenderedMessage

API_ROOT = "https://api.twilio.com"
API_VERSION = "2010-04-01"
SIGNATURE_HEADER = "X-Twilio-Signature"
FINAL_STATUSES = {"delivered", "undelivered", "failed"}


def messages_path(account_sid: str) -> str:
    return f"/{API_VERSION}/Accounts/{account_sid}/Messages.json"


def signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """Twilio's request signature: the full URL, then every POST field's name and value, sorted by name."""
    data = url + "".join(name + value for name, value in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def _url_variants(url: str) -> list[str]:
    """Twilio signs the URL as configured; a proxy may add or drop the default port, so try both forms."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    variants = [url]
    if parts.port is None and default is not None and parts.hostname:
        variants.append(urlunsplit(parts._replace(netloc=f"{parts.netloc}:{default}")))
    elif parts.port == default and parts.hostname:
        variants.append(urlunsplit(parts._replace(netloc=parts.netloc.rsplit(":", 1)[0])))
    return variants


def verify(auth_token: str, url: str, params: list[tuple[str, str]], header: str | None) -> bool:
    if not header:
        return False
    return any(
        hmac.compare_digest(signature(auth_token, candidate, params), header) for candidate in _url_variants(url)
    )


class TwilioAdapter(HttpAdapter):
    """Options: `from` (a Twilio number or alphanumeric sender ID) or `messaging_service_sid` (one is
    required); `status_callback` (the URL Twilio posts delivery status to; unset: the account's or
    messaging service's configured callback)."""

    scheme = "twilio"
    channel_kind = "sms"
    # Twilio refuses bodies over 1,600 characters (21617); a US long code sends 1 message/s (short codes 100).
    limits = Limits(body_maxlen=1600, rate_per_s=1.0)
    returns_provider_ids = True
    sends_receipts = True

    class Credentials(BaseModel):
        account_sid: str = "AC00000000000000000000000000000000"
        auth_token: SecretStr = SecretStr("loopcast-dev-twilio-token")

    @classmethod
    def parse_receipts(cls, credentials: Credentials, request: ReceiptRequest) -> list[Receipt]:
        try:
            params = parse_qsl(request.body.decode(), keep_blank_values=True, strict_parsing=bool(request.body))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ReceiptRejected(f"malformed status callback: {exc!r}") from None
        token = credentials.auth_token.get_secret_value()
        if not verify(token, request.url, params, request.headers.get(SIGNATURE_HEADER)):
            raise bad_signature()
        fields = dict(params)
        sid, status = fields.get("MessageSid"), fields.get("MessageStatus")
        if not sid or not status:
            raise ReceiptRejected("status callback without MessageSid or MessageStatus")
        if status not in FINAL_STATUSES:
            return []  # queued, sending, sent, accepted, scheduled, read: not a delivery verdict
        delivered = status == "delivered"
        return [
            Receipt(
                provider_message_id=sid,
                delivered=delivered,
                error_code=None if delivered else (fields.get("ErrorCode") or status),
            )
        ]

    @classmethod
    def receipt_answer(cls) -> tuple[int, str, str]:
        return 200, "", "text/plain"

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        self.sender = channel.options.get("from")
        self.service_sid = channel.options.get("messaging_service_sid")
        if not self.sender and not self.service_sid:
            raise ValueError(f"channel {channel.id!r}: twilio needs options 'from' or 'messaging_service_sid'")
        self.status_callback = channel.options.get("status_callback")
        self.url = root_url(channel, API_ROOT) + messages_path(credentials.account_sid)
        basic = f"{credentials.account_sid}:{credentials.auth_token.get_secret_value()}"
        self.headers = {"Authorization": "Basic " + base64.b64encode(basic.encode()).decode()}

    def form(self, message: RenderedMessage) -> dict[str, str]:
        data = {"To": message.address, "Body": message.body}
        if self.service_sid:
            data["MessagingServiceSid"] = self.service_sid
        if self.sender:
            data["From"] = self.sender
        if self.status_callback:
            data["StatusCallback"] = self.status_callback
        return data

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        response = await self.request("POST", self.url, data=self.form(message), headers=self.headers)
        if isinstance(response, DeliveryResult):
            return response
        text = response.text
        answer = response.json_object()
        if not response.ok:
            code = answer.get("code") if isinstance(answer, dict) else None
            # 20003 (authenticate) and 21211 (invalid To) stay final; 20429 / 5xx retry via the status.
            return response.failure(code=str(code) if code else None)
        if not isinstance(answer, dict) or not isinstance(answer.get("sid"), str):
            return malformed(text)  # no idempotency key on Messages: a retry could send twice
        return accepted(answer["sid"], text)
