"""Twilio SendGrid v3 Mail Send: 202 with an empty body, the id only in the X-Message-Id header.
Event Webhook receipts are signed with ECDSA (P-256, SHA-256 over timestamp + raw body) and name
the message as "<X-Message-Id>.<filter suffix>", so we correlate by the part before the first dot.
"""

from __future__ import annotations

import base64
import json
import time
from email.utils import parseaddr

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    DeliveryResult,
    HttpAdapter,
    Limits,
    Receipt,
    ReceiptRequest,
    accepted,
    bad_signature,
    batched_receipts,
    http_failure,
    malformed,
)
from connectors.channels.devkeys import dev_private_key, public_key_pem
from schemas.config import Channel
from schemas.models import RenderedMessage

API_ROOT = "https://api.sendgrid.com"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
DEV_KEY_NAME = "sendgrid-event-webhook"
# SendGrid refuses some headers in `headers` (its own X-SG-*, and those it sets itself).
RESERVED_HEADERS = frozenset(
    {"x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type", "content-transfer-encoding", "to", "from"}
    | {"subject", "reply-to", "cc", "bcc"}
)


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The console shows the verification key as base64 of its DER SubjectPublicKeyInfo; PEM works too."""
    text = text.strip()
    key = (
        serialization.load_pem_public_key(text.encode())
        if text.startswith("-----BEGIN")
        else serialization.load_der_public_key(base64.b64decode(text))
    )
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("the Event Webhook verification key is not an EC key")
    return key


def sign_events(private_pem: str, body: bytes, timestamp: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return base64.b64encode(key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()


def verify_events(public_key: str, body: bytes, signature: str | None, timestamp: str | None) -> bool:
    if not signature or not timestamp:
        return False
    try:
        load_public_key(public_key).verify(
            base64.b64decode(signature), timestamp.encode() + body, ec.ECDSA(hashes.SHA256())
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def mail_body(message: RenderedMessage, sender: tuple[str, str]) -> dict:
    extra = json.loads(message.extra) if message.extra else {}
    name, address = sender
    content = [{"type": "text/plain", "value": message.body}]  # text/plain must come first
    if message.html:
        content.append({"type": "text/html", "value": message.html})
    body: dict = {
        "personalizations": [{"to": [{"email": message.address}], "custom_args": {"message_id": message.message_id}}],
        "from": {"email": address, **({"name": name} if name else {})},
        "subject": message.title or "",
        "content": content,
    }
    headers = {
        str(k): str(v) for k, v in (extra.get("headers") or {}).items() if v and k.lower() not in RESERVED_HEADERS
    }
    if headers:
        body["headers"] = headers
    return body


class SendgridAdapter(HttpAdapter):
    """Options: `from` (an RFC 5322 mailbox of a verified sender; default "<brand> <no-reply@example.com>").

    Receipts: delivered → delivered; bounce and dropped → undelivered (error code = the bounce
    classification or reason); processed, deferred, open, click … are not terminal and are ignored.
    The signature timestamp is not checked for freshness: SendGrid retries failed posts for up to
    24 hours, and a replayed receipt is idempotent here.
    """

    scheme = "sendgrid"
    channel_kind = "email"
    # Mail Send takes up to 10,000 requests/s per account; a message (with attachments) is at most 30 MB.
    limits = Limits(title_maxlen=998, body_maxlen=30_000_000, rate_per_s=10_000)
    returns_provider_ids = True
    sends_receipts = True

    class Credentials(BaseModel):
        api_key: SecretStr = SecretStr("SG.loopcast-dev.sendgrid-sandbox-key")
        # The Event Webhook's verification key (base64 DER or PEM); dev default: the local dev key's public half.
        event_webhook_public_key: str | None = None

    @classmethod
    def credentials_from(cls, settings) -> Credentials:
        credentials = cls.Credentials.model_validate(settings.providers.get(cls.settings_key(), {}))
        if credentials.event_webhook_public_key is None:
            public = public_key_pem(dev_private_key(settings.home, DEV_KEY_NAME, "ec"))
            credentials = credentials.model_copy(update={"event_webhook_public_key": public})
        return credentials

    @classmethod
    def parse_receipts(cls, credentials: Credentials, request: ReceiptRequest) -> list[Receipt]:
        if not credentials.event_webhook_public_key or not verify_events(
            credentials.event_webhook_public_key,
            request.body,
            request.headers.get(SIGNATURE_HEADER),
            request.headers.get(TIMESTAMP_HEADER),
        ):
            raise bad_signature()

        def read(event: dict) -> Receipt | None:
            kind = event["event"]
            if kind not in ("delivered", "bounce", "dropped"):
                return None  # processed, deferred, open, click: not a final delivery report
            provider_id = str(event["sg_message_id"]).split(".", 1)[0]
            error = None if kind == "delivered" else str(event.get("type") or event.get("reason") or kind)
            return Receipt(provider_message_id=provider_id, delivered=kind == "delivered", error_code=error)

        return batched_receipts(request.body, "event batch", read)

    @classmethod
    def receipt_answer(cls) -> tuple[int, str, str]:
        return 200, "", "text/plain"  # any 2xx; SendGrid ignores the body

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        name, address = parseaddr(
            channel.options.get("from") or f"{channel.brand or 'Loopcast'} <no-reply@example.com>"
        )
        if "@" not in address:
            raise ValueError(
                f"channel {channel.id!r}: options['from'] is not a mailbox: {channel.options.get('from')!r}"
            )
        self.sender = (name, address)
        self.url = f"{str(channel.url or API_ROOT).rstrip('/')}/v3/mail/send"

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        headers = {"Authorization": f"Bearer {self.credentials.api_key.get_secret_value()}"}
        answer = await self.request("POST", self.url, json=mail_body(message, self.sender), headers=headers)
        if isinstance(answer, DeliveryResult):
            return answer
        if not answer.ok:
            retry_after = answer.retry_after or _until(answer.headers.get("X-RateLimit-Reset"))
            return http_failure(answer.status, answer.text, retry_after)
        provider_id = answer.headers.get("X-Message-Id")
        if not provider_id:
            return malformed(answer.text)  # Mail Send has no idempotency key: a retry could send twice
        return accepted(provider_id, answer.text)


def _until(reset: str | None) -> str | None:
    """X-RateLimit-Reset is a Unix time; the wait is what is left of it."""
    try:
        return str(max(0.0, float(reset) - time.time())) if reset else None
    except ValueError:
        return None
