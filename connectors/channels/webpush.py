"""Web Push (RFC 8030) with VAPID (RFC 8292) and aes128gcm message encryption (RFC 8291): the address is the
browser's PushSubscription JSON, each endpoint belongs to whichever push service the browser uses, and only
the browser can read the payload, so the push service's answer (201 + Location) is all we learn.

pywebpush's webpush() is synchronous (requests), so the pieces are assembled here: http_ece encrypts, PyJWT
signs the VAPID token, aiohttp posts.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    DeliveryResult,
    HttpAdapter,
    Limits,
    accepted,
    malformed,
    rejected,
)
from connectors.channels.devkeys import dev_private_key
from schemas.config import Channel
from schemas.models import RenderedMessage

# Push services must accept 4096 bytes of encrypted body: one aes128gcm record with an 86-byte header
# (salt, record size, sender key) and 17 bytes of padding delimiter and tag leaves 3993 for the JSON.
MAX_PLAINTEXT_BYTES = 4096 - 86 - 17
VAPID_LIFETIME_S = 12 * 3600  # RFC 8292 allows up to 24 h
URGENCY = {"high": "high", "normal": "normal", "low": "low"}
ERRORS = {404: "subscription_not_found", 410: "subscription_gone", 413: "payload_too_large"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def raw_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def vapid_header(private_pem: str, audience: str, subject: str, now: int | None = None) -> str:
    """`Authorization: vapid t=<ES256 JWT>,k=<the signing key's public point>` for one push service origin."""
    key = serialization.load_pem_private_key(private_pem.encode(), None)
    iat = int(now if now is not None else time.time())
    token = jwt.encode({"aud": audience, "exp": iat + VAPID_LIFETIME_S, "sub": subject}, key, algorithm="ES256")
    return f"vapid t={token},k={b64url(raw_public_key(key.public_key()))}"


def encrypt(plaintext: bytes, p256dh: str, auth: str) -> bytes:
    """One aes128gcm record for the subscription's keys, with a fresh sender key and salt (RFC 8291)."""
    return http_ece.encrypt(
        plaintext,
        salt=os.urandom(16),
        private_key=ec.generate_private_key(ec.SECP256R1()),
        dh=b64url_decode(p256dh),
        auth_secret=b64url_decode(auth),
        version="aes128gcm",
    )


class WebPushAdapter(HttpAdapter):
    """Options: `ttl_s` (how long the push service keeps an undelivered message, default 86400), `topic`
    (Topic header: a newer message with the same topic replaces an undelivered one)."""

    scheme = "webpush"
    channel_kind = "push"
    # Browsers impose no fixed title/body lengths; the real cap is the 4096-byte encrypted body (checked in send()).
    limits = Limits()
    returns_provider_ids = True
    sends_receipts = False

    class Credentials(BaseModel):
        vapid_private_key: SecretStr = SecretStr("")  # PEM (EC P-256); empty → the local dev key
        vapid_subject: str = "mailto:push@loopcast.invalid"

    @classmethod
    def credentials_from(cls, settings) -> Credentials:
        credentials = cls.Credentials.model_validate(settings.providers.get(cls.settings_key(), {}))
        if credentials.vapid_private_key.get_secret_value():
            return credentials
        return credentials.model_copy(
            update={"vapid_private_key": SecretStr(dev_private_key(settings.home, "vapid", "ec"))}
        )

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        if not credentials.vapid_subject.startswith(("mailto:", "https:")):
            raise ValueError(f"channel {channel.id!r}: webpush vapid_subject must be a mailto: or https: URL")
        self.ttl_s = int(channel.options.get("ttl_s", 86400))
        self.topic = channel.options.get("topic")
        self._vapid: dict[str, tuple[str, float]] = {}  # push service origin → (header, renew after)

    def _authorization(self, audience: str) -> str:
        cached = self._vapid.get(audience)
        if cached and time.time() < cached[1]:
            return cached[0]
        header = vapid_header(
            self.credentials.vapid_private_key.get_secret_value(), audience, self.credentials.vapid_subject
        )
        self._vapid[audience] = (header, time.time() + VAPID_LIFETIME_S - 3600)
        return header

    @staticmethod
    def notification(message: RenderedMessage) -> dict[str, Any]:
        """What the service worker receives in its push event (event.data.json())."""
        extra = json.loads(message.extra) if message.extra else {}
        fields = {
            "message_id": message.message_id,
            "title": message.title,
            "body": message.body,
            "link": message.link,
            "image": message.image_url,
            "badge": extra.get("badge"),
        }
        return {k: v for k, v in fields.items() if v is not None}

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        try:
            subscription = json.loads(message.address)
            endpoint, keys = str(subscription["endpoint"]), subscription["keys"]
            p256dh, auth = str(keys["p256dh"]), str(keys["auth"])
            if urlsplit(endpoint).scheme not in ("https", "http"):
                raise ValueError(endpoint)
        except (ValueError, KeyError, TypeError):
            return rejected("invalid_subscription", message.address[:200])
        plaintext = json.dumps(self.notification(message), ensure_ascii=False, separators=(",", ":")).encode()
        if len(plaintext) > MAX_PLAINTEXT_BYTES:
            return rejected("payload_too_large", f"{len(plaintext)} bytes")
        try:
            body = encrypt(plaintext, p256dh, auth)
        except (ValueError, TypeError) as exc:  # keys that are not a P-256 point / 16-byte secret
            return rejected("invalid_subscription", repr(exc))
        headers = {
            "TTL": str(self.ttl_s),
            "Urgency": URGENCY.get(message.priority.value, "normal"),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": self._authorization(origin(endpoint)),
        }
        if self.topic:
            headers["Topic"] = self.topic
        answer = await self.request("POST", endpoint, data=body, headers=headers)
        if isinstance(answer, DeliveryResult):
            return answer
        if not answer.ok:
            status = answer.status
            return answer.failure(code=ERRORS.get(status) or ("vapid_rejected" if status in (401, 403) else None))
        location = answer.headers.get("Location")
        if not location:
            return malformed(answer.text)  # a push service answers 201 with the message's Location; no dedup key
        return accepted(location, answer.text)
