"""Twilio SendGrid v3 Mail Send: 202 with an empty body, the id only in the X-Message-Id header.
Event Webhook receipts are signed with ECDSA (P-256, SHA-256 over timestamp + raw body) and name
the message as "<X-Message-Id>.<filter suffix>"; our custom arg `message_id` comes back on every event.

With the channel option `batch_max` (2-1000) the messages being sent at the same moment go as one
Mail Send request: one personalization per message (its own recipient, subject, headers and custom
args), the text and html bodies as its substitutions for tags in the shared content. One request
answers one X-Message-Id for all, so a message's provider id is "<X-Message-Id>:<message_id>" (for a
single send too). Messages that cannot share a request go in another: html with html only, an
address once per request (SendGrid refuses repeats), and a message without a subject or body, or
whose bodies pass the 10,000-byte substitutions limit, alone as an ordinary send.
"""

from __future__ import annotations

import base64
import time
from email.utils import parseaddr

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    CallBatching,
    DeliveryResult,
    HttpAdapter,
    Limits,
    Receipt,
    ReceiptRequest,
    accepted,
    as_messages,
    bad_signature,
    batched_receipts,
    calls_of,
    http_failure,
    malformed,
    message_extra,
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
# Mail Send takes at most this many personalizations in one request.
BATCH_MOST = 1000
# Substitutions (tags and values, UTF-8) are limited to this many bytes per personalization.
SUBSTITUTIONS_MOST = 10_000
# A batch's shared content is these tags, each personalization substituting its own bodies; the
# random-looking part keeps copy from ever containing one by chance.
TEXT_TAG = "-loopcast-text-6d2f91-"
HTML_TAG = "-loopcast-html-6d2f91-"


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


def extra_headers(message: RenderedMessage) -> dict[str, str]:
    """The copy engine's extra headers (List-Unsubscribe …), less those SendGrid refuses or sets itself."""
    given = message_extra(message).get("headers")
    if not isinstance(given, dict):
        return {}
    return {str(k): str(v) for k, v in given.items() if v and str(k).lower() not in RESERVED_HEADERS}


def sender_object(sender: tuple[str, str]) -> dict:
    name, address = sender
    return {"email": address, **({"name": name} if name else {})}


def mail_body(message: RenderedMessage, sender: tuple[str, str]) -> dict:
    content = [{"type": "text/plain", "value": message.body}]  # text/plain must come first
    if message.html:
        content.append({"type": "text/html", "value": message.html})
    body: dict = {
        "personalizations": [{"to": [{"email": message.address}], "custom_args": {"message_id": message.message_id}}],
        "from": sender_object(sender),
        "subject": message.title or "",
        "content": content,
    }
    headers = extra_headers(message)
    if headers:
        body["headers"] = headers
    return body


def substitutions(message: RenderedMessage) -> dict[str, str]:
    values = {TEXT_TAG: message.body}
    if message.html:
        values[HTML_TAG] = message.html
    return values


def substitutions_size(values: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in values.items())


def shareable(message: RenderedMessage) -> bool:
    """Whether the message may go as one personalization of many. One without a subject or body goes
    alone, so SendGrid's refusal of it is its own and not the whole request's."""
    return bool(message.title and message.body) and substitutions_size(substitutions(message)) <= SUBSTITUTIONS_MOST


def personalization(message: RenderedMessage) -> dict:
    entry: dict = {
        "to": [{"email": message.address}],
        "subject": message.title,
        "custom_args": {"message_id": message.message_id},
        "substitutions": substitutions(message),
    }
    headers = extra_headers(message)
    if headers:
        entry["headers"] = headers
    return entry


def batch_body(messages: list[RenderedMessage], sender: tuple[str, str]) -> dict:
    """One request for many messages of one kind (all with html, or none): the content is the tags."""
    content = [{"type": "text/plain", "value": TEXT_TAG}]
    if messages[0].html:
        content.append({"type": "text/html", "value": HTML_TAG})
    return {
        "personalizations": [personalization(m) for m in messages],
        "from": sender_object(sender),
        "content": content,
    }


def mail_sends(messages: list[RenderedMessage]) -> list[list[RenderedMessage]]:
    """The messages as requests: one kind of content each, no address twice in one (SendGrid refuses
    the request), and a message that cannot share one alone."""
    return calls_of(
        messages,
        kind=lambda m: bool(m.html) if shareable(m) else None,
        key=lambda m: m.address.strip().lower(),
    )


def message_key(x_message_id: str, message_id: str) -> str:
    """A message's provider id: the request's X-Message-Id and our message_id (a batch shares the former)."""
    return f"{x_message_id}:{message_id}"


class SendgridAdapter(CallBatching, HttpAdapter):
    """Options: `from` (an RFC 5322 mailbox of a verified sender; default "<brand> <no-reply@example.com>"),
    `batch_max` (1-1000, default 1: how many messages one Mail Send request may carry).

    Receipts: delivered → delivered; bounce and dropped → undelivered (error code = the bounce
    classification or reason); processed, deferred, open, click … are not terminal and are ignored.
    The signature timestamp is not checked for freshness: SendGrid retries failed posts for up to
    24 hours, and a replayed receipt is idempotent here.
    """

    scheme = "sendgrid"
    batch_most = BATCH_MOST
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
            x_message_id = str(event["sg_message_id"]).split(".", 1)[0]
            # Custom args come back as top-level fields; an event without ours names a message sent
            # before provider ids carried the message_id (the X-Message-Id alone).
            message_id = event.get("message_id")
            provider_id = message_key(x_message_id, str(message_id)) if message_id else x_message_id
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
        self.start_batching(channel)

    def calls(self, messages: list[RenderedMessage]) -> list[list[RenderedMessage]]:
        return mail_sends(messages)

    async def send_call(self, call: list[RenderedMessage]) -> list[DeliveryResult]:
        # A lone message goes as an ordinary send: nothing to share, and no tags to substitute.
        body = mail_body(call[0], self.sender) if len(call) == 1 else batch_body(call, self.sender)
        return as_messages(
            call, await self._post(body), lambda x_message_id, m: message_key(x_message_id, m.message_id)
        )

    async def _post(self, body: dict) -> DeliveryResult:
        """One Mail Send request; accepted carries the request's X-Message-Id as its provider id."""
        headers = {"Authorization": f"Bearer {self.credentials.api_key.get_secret_value()}"}
        answer = await self.request("POST", self.url, json=body, headers=headers)
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
