"""A generic HTTP SMS gateway, the shape regional SMS resellers expose: JSON in, an id out, DLRs (SMPP states
DELIVRD/UNDELIV/EXPIRED/REJECTD) posted back. Both directions carry X-Timestamp and X-Signature =
hex HMAC-SHA256(secret, "<timestamp>.<body>"), so either side can refuse forgeries and replays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

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
    rejected,
)
from schemas.config import Channel
from schemas.models import RenderedMessage

KEY_HEADER = "X-Api-Key"
TIMESTAMP_HEADER = "X-Timestamp"
SIGNATURE_HEADER = "X-Signature"
# SMPP final message states; ENROUTE / ACCEPTD are on the way and say nothing yet.
FINAL_STATES = {"DELIVRD", "UNDELIV", "EXPIRED", "REJECTD", "DELETED", "UNKNOWN"}


def sign(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify(
    secret: str,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    now: float | None = None,
    tolerance_s: int = 300,
) -> bool:
    if not timestamp or not signature:
        return False
    try:
        stamp = int(timestamp)
    except ValueError:
        return False
    if abs((now or time.time()) - stamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, stamp, body), signature)


def signed_headers(api_key: str, secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        KEY_HEADER: api_key,
        TIMESTAMP_HEADER: str(stamp),
        SIGNATURE_HEADER: sign(secret, stamp, body),
    }


class HttpSmsAdapter(HttpAdapter):
    """Options: `path` (the send endpoint under the channel's url, default /send), `sender` (sender ID or
    number, default the channel's brand; unset: the gateway's default). The channel url is required: there is
    no public default gateway. DLRs: point the gateway at <loopcast>/receipts/http-sms."""

    scheme = "http-sms"
    channel_kind = "sms"
    # Resellers concatenate up to 10 GSM-7 parts (10 x 153); their rate is per contract: set the channel's rate_per_s.
    limits = Limits(body_maxlen=1530)
    returns_provider_ids = True
    sends_receipts = True

    class Credentials(BaseModel):
        api_key: str = "loopcast-dev-http-sms-key"
        api_secret: SecretStr = SecretStr("loopcast-dev-http-sms-secret")

    @classmethod
    def parse_receipts(cls, credentials: Credentials, request: ReceiptRequest) -> list[Receipt]:
        headers = request.headers
        secret = credentials.api_secret.get_secret_value()
        if not verify(secret, request.body, headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER)):
            raise bad_signature()
        try:
            dlr = json.loads(request.body)
            state = str(dlr["status"]).upper()
            provider_id = str(dlr["id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ReceiptRejected(f"malformed DLR: {exc!r}") from None
        if state not in FINAL_STATES:
            return []
        delivered, err = state == "DELIVRD", dlr.get("err")
        code = None if delivered else (f"{state}:{err}" if err else state)
        return [Receipt(provider_message_id=provider_id, delivered=delivered, error_code=code)]

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        if channel.url is None:
            raise ValueError(f"channel {channel.id!r}: http-sms needs the gateway's url")
        path = channel.options.get("path") or "/send"
        self.url = str(channel.url).rstrip("/") + "/" + path.lstrip("/")
        self.sender = channel.options.get("sender") or channel.brand

    def payload(self, message: RenderedMessage) -> bytes:
        request = {"to": message.address, "text": message.body, "sender": self.sender, "ref": message.message_id}
        return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = self.payload(message)
        secret = self.credentials.api_secret.get_secret_value()
        headers = signed_headers(self.credentials.api_key, secret, body)
        response = await self.request("POST", self.url, data=body, headers=headers)
        if isinstance(response, DeliveryResult):
            return response
        text = response.text
        answer = response.json_object()
        if not response.ok:
            code = answer.get("error") if isinstance(answer, dict) else None
            return response.failure(code=str(code) if code else None)
        if not isinstance(answer, dict) or answer.get("id") in (None, ""):
            return malformed(text)  # not every reseller dedups `ref`: never risk sending twice
        if str(answer.get("status", "queued")).lower() in ("rejected", "failed"):
            return rejected(str(answer.get("error") or "rejected"), text)
        return accepted(str(answer["id"]), text)
