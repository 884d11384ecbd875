"""Apple Push Notification service, token-based provider API: HTTP/2 only, one POST per device token, signed
with an ES256 JWT that APNs wants reused (a new one more often than every 20 min is throttled, one older
than an hour is refused), so it is minted once and kept for 50 minutes.

Success is the status line alone (200 + apns-id); errors are {"reason": ...} with the real status code.
"""

from __future__ import annotations

import json
import ssl
import time
import uuid
from typing import Any

import httpx
import jwt
from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    ChannelAdapter,
    DeliveryResult,
    Limits,
    TokenCache,
    accepted,
    http_failure,
    rejected,
    transport_failure,
)
from connectors.channels.devkeys import dev_private_key
from schemas.config import Channel
from schemas.models import Priority, RenderedMessage

APNS_PRODUCTION = "https://api.push.apple.com"
MAX_PAYLOAD_BYTES = 4096
TOKEN_REUSE_S = 50 * 60
# apns-id is derived from our message id, so a resent message carries the same id in APNs' logs.
APNS_ID_NAMESPACE = uuid.UUID("6f3c1c3e-6a43-4e53-9a0f-6c6f6f706361")


def apns_id(message_id: str) -> str:
    return str(uuid.uuid5(APNS_ID_NAMESPACE, message_id))


def provider_token(credentials: ApnsAdapter.Credentials, now: int | None = None) -> str:
    """The ES256 provider authentication token: kid = the key's id, iss = the team, iat = now."""
    claims = {"iss": credentials.team_id, "iat": int(now if now is not None else time.time())}
    return jwt.encode(
        claims, credentials.auth_key.get_secret_value(), algorithm="ES256", headers={"kid": credentials.key_id}
    )


class ApnsAdapter(ChannelAdapter):
    """Options: `topic` (required: the app's bundle id), `ca_file` (a CA bundle to trust, e.g. the local
    sandbox's self-signed certificate), `expiration_s` (how long APNs keeps trying, default 86400; 0 = once),
    `sound` (default "default")."""

    scheme = "apns"
    channel_kind = "push"
    # streams/copy/channels.py RULES push-apns; the 4096-byte payload cap is checked in send().
    limits = Limits(title_maxlen=40, body_maxlen=110)
    returns_provider_ids = True
    sends_receipts = False

    class Credentials(BaseModel):
        team_id: str = "LOOPCASTDV"
        key_id: str = "SANDBOXKEY"
        auth_key: SecretStr = SecretStr("")  # the .p8 key's PEM (EC P-256); empty → the local dev key

    @classmethod
    def credentials_from(cls, settings) -> Credentials:
        credentials = cls.Credentials.model_validate(settings.providers.get(cls.settings_key(), {}))
        if credentials.auth_key.get_secret_value():
            return credentials
        return credentials.model_copy(
            update={"auth_key": SecretStr(dev_private_key(settings.home, "apns-auth-key", "ec"))}
        )

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        self.topic = channel.options.get("topic")
        if not self.topic:
            raise ValueError(f"channel {channel.id!r}: apns needs options.topic (the app's bundle id)")
        if not credentials.auth_key.get_secret_value():
            raise ValueError(f"channel {channel.id!r}: apns needs an auth_key")
        self.root = str(channel.url).rstrip("/") if channel.url else APNS_PRODUCTION
        self.expiration_s = int(channel.options.get("expiration_s", 86400))
        self.sound = channel.options.get("sound", "default")
        verify: ssl.SSLContext | bool = True
        if channel.options.get("ca_file"):
            verify = ssl.create_default_context(cafile=channel.options["ca_file"])
        # HTTP/2 is negotiated by ALPN over TLS; APNs refuses HTTP/1.1.
        self.client = httpx.AsyncClient(
            http2=True,
            verify=verify,
            timeout=httpx.Timeout(channel.timeout_s),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
        )
        self.token = TokenCache(self._mint_token)

    async def _mint_token(self) -> tuple[str, float]:
        return provider_token(self.credentials, int(time.time())), TOKEN_REUSE_S

    def payload(self, message: RenderedMessage) -> dict[str, Any]:
        extra = json.loads(message.extra) if message.extra else {}
        alert = {k: v for k, v in (("title", message.title), ("body", message.body)) if v}
        aps: dict[str, Any] = {"alert": alert, "sound": self.sound}
        if extra.get("badge") is not None:
            aps["badge"] = int(extra["badge"])
        body: dict[str, Any] = {"aps": aps, "message_id": message.message_id}
        if message.image_url:
            aps["mutable-content"] = 1  # the app's notification service extension downloads `image`
            body["image"] = message.image_url
        if message.link:
            body["link"] = message.link
        return body

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = json.dumps(self.payload(message), ensure_ascii=False, separators=(",", ":")).encode()
        if len(body) > MAX_PAYLOAD_BYTES:
            return rejected("PayloadTooLarge", f"{len(body)} bytes")
        our_id = apns_id(message.message_id)
        headers = {
            "apns-topic": self.topic,
            "apns-push-type": "alert",
            "apns-priority": "10" if message.priority == Priority.high else "5",
            "apns-id": our_id,
            "apns-expiration": str(int(time.time()) + self.expiration_s if self.expiration_s else 0),
        }
        url = f"{self.root}/3/device/{message.address}"

        async def post(token: str) -> httpx.Response:
            return await self.client.post(url, content=body, headers={**headers, "authorization": f"bearer {token}"})

        def expired(response: httpx.Response) -> bool:  # mint a fresh token once
            return response.status_code == 403 and _reason(response.text) == "ExpiredProviderToken"

        try:
            response = await self.token.call(post, expired)
        except httpx.HTTPError as exc:
            return transport_failure(exc)
        if isinstance(response, DeliveryResult):
            return response
        if response.status_code == 200:
            # The status line is the answer; APNs' body is empty and anything in it is ignored.
            return accepted(response.headers.get("apns-id") or our_id, response.text)
        reason = _reason(response.text)
        return http_failure(response.status_code, response.text, response.headers.get("retry-after"), code=reason)

    async def close(self) -> None:
        await self.client.aclose()


def _reason(text: str) -> str | None:
    try:
        return str(json.loads(text)["reason"])
    except (ValueError, KeyError, TypeError):
        return None
