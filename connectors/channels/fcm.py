"""Firebase Cloud Messaging, HTTP v1 API: one device token per request, authorised by a service account's
RS256-signed JWT traded for a one-hour OAuth access token (cached, refreshed once when FCM says it expired).

Sent over HTTP/2, as Google advises for v1 throughput and as the Firebase Admin SDKs do: concurrent sends are
streams multiplexed on a few connections instead of a request per pooled HTTP/1.1 connection.

Errors come in Google's format; the FcmError `errorCode` in `details` is the one worth acting on.
"""

from __future__ import annotations

import json
import ssl
import time
from typing import Any

import httpx
import jwt
from pydantic import BaseModel, SecretStr

from connectors.channels.base import (
    Answer,
    ChannelAdapter,
    DeliveryResult,
    Limits,
    TokenCache,
    accepted,
    flag_option,
    malformed,
    rejected,
    root_url,
    transport_failure,
)
from connectors.channels.devkeys import dev_private_key
from schemas.config import Channel
from schemas.models import Priority, RenderedMessage

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
# A token is renewed this long before Google says it expires, so no send races its expiry.
TOKEN_MARGIN_S = 300
MAX_PAYLOAD_BYTES = 4096
RETRYABLE = {"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED"}
# HTTP/2 connections per adapter: each carries up to the server's stream limit (100 at Google) at once, so a
# few cover a worker's send slots; more are opened only when those are full.
H2_CONNECTIONS = 4
# With the `http2: "false"` opt-out, every in-flight send needs a connection of its own.
HTTP1_CONNECTIONS = 64


def assertion(credentials: FcmAdapter.Credentials, now: int | None = None) -> str:
    """The service account's signed request for an access token (RFC 7523)."""
    iat = int(now if now is not None else time.time())
    claims = {
        "iss": credentials.client_email,
        "scope": SCOPE,
        "aud": credentials.token_uri,
        "iat": iat,
        "exp": iat + 3600,
    }
    return jwt.encode(claims, credentials.private_key.get_secret_value(), algorithm="RS256")


def fcm_error(text: str) -> str | None:
    """The FcmError errorCode of a Google error body, else its canonical status."""
    try:
        error = json.loads(text)["error"]
        for detail in error.get("details") or []:
            if detail.get("@type") == FCM_ERROR_TYPE and detail.get("errorCode"):
                return str(detail["errorCode"])
        return str(error.get("status")) if error.get("status") else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class FcmAdapter(ChannelAdapter):
    """Options: `project_id` (else the service account's), `ttl_s` (Android TTL, default FCM's 4 weeks),
    `android_channel_id` (Android notification channel), `ca_file` (a CA bundle to trust, e.g. the local
    sandbox's self-signed certificate), `http2` (default "true"; "false" sends HTTP/1.1)."""

    scheme = "fcm"
    channel_kind = "push"
    # streams/copy/channels.py RULES push-fcm; the 4096-byte payload cap is checked in send().
    limits = Limits(title_maxlen=65, body_maxlen=240)
    returns_provider_ids = True
    sends_receipts = False

    class Credentials(BaseModel):
        client_email: str = "loopcast-dev@loopcast-sandbox.iam.gserviceaccount.com"
        private_key: SecretStr = SecretStr("")  # PEM (RSA); empty → the local dev key
        token_uri: str = GOOGLE_TOKEN_URI
        project_id: str = "loopcast-sandbox"

    @classmethod
    def credentials_from(cls, settings) -> Credentials:
        raw = dict(settings.providers.get(cls.settings_key(), {}))
        credentials = cls.Credentials.model_validate(raw)
        if credentials.private_key.get_secret_value():
            return credentials
        # No service account configured: a local stack signs with its own key, and the sandbox
        # (which stands in for oauth2.googleapis.com) verifies with the public half.
        return credentials.model_copy(
            update={
                "private_key": SecretStr(dev_private_key(settings.home, "fcm-service-account", "rsa")),
                "token_uri": raw.get("token_uri") or f"{settings.sandbox_base}/fcm/token",
            }
        )

    def __init__(self, channel: Channel, credentials: Credentials) -> None:
        super().__init__(channel, credentials)
        self.project_id = channel.options.get("project_id") or credentials.project_id
        if not self.project_id:
            raise ValueError(f"channel {channel.id!r}: fcm needs options.project_id or a service account project_id")
        if not credentials.private_key.get_secret_value():
            raise ValueError(f"channel {channel.id!r}: fcm needs a service account private_key")
        root = root_url(channel, "https://fcm.googleapis.com")
        self.url = f"{root}/v1/projects/{self.project_id}/messages:send"
        self.ttl_s = channel.options.get("ttl_s")
        self.android_channel_id = channel.options.get("android_channel_id")
        self.token = TokenCache(self._fetch_token)
        verify: ssl.SSLContext | bool = True
        if channel.options.get("ca_file"):
            verify = ssl.create_default_context(cafile=channel.options["ca_file"])
        # HTTP/2 is negotiated by ALPN over TLS (a plain http:// url, like the sandbox's /fcm, stays HTTP/1.1).
        # One client for the token endpoint too: it is called about once an hour.
        http2 = flag_option(channel.options.get("http2"), True)
        connections = H2_CONNECTIONS if http2 else HTTP1_CONNECTIONS
        self.client = httpx.AsyncClient(
            http2=http2,
            verify=verify,
            timeout=httpx.Timeout(channel.timeout_s),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    async def request(self, method: str, url: str, **kwargs: Any) -> Answer | DeliveryResult:
        """One HTTP exchange: the provider's answer, or a `transport_failure` when none came."""
        try:
            response = await self.client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            return transport_failure(exc)
        return Answer(response.status_code, response.text, response.headers)

    async def close(self) -> None:
        await self.client.aclose()

    def body(self, message: RenderedMessage) -> dict[str, Any]:
        extra = json.loads(message.extra) if message.extra else {}
        notification = {"title": message.title, "body": message.body, "image": message.image_url}
        data = {"message_id": message.message_id, "link": message.link}
        high = message.priority == Priority.high
        android: dict[str, Any] = {"priority": "HIGH" if high else "NORMAL"}
        if self.ttl_s:
            android["ttl"] = f"{int(self.ttl_s)}s"
        android_notification: dict[str, Any] = {}
        if self.android_channel_id:
            android_notification["channel_id"] = self.android_channel_id
        aps: dict[str, Any] = {}
        if extra.get("badge") is not None:
            aps["badge"] = android_notification["notification_count"] = int(extra["badge"])
        if message.image_url:
            aps["mutable-content"] = 1  # lets the iOS app's service extension fetch the image
        if android_notification:
            android["notification"] = android_notification
        result: dict[str, Any] = {
            "token": message.address,
            "notification": {k: v for k, v in notification.items() if v},
            # FCM data values must all be strings.
            "data": {k: str(v) for k, v in data.items() if v is not None},
            "android": android,
            "apns": {"headers": {"apns-priority": "10" if high else "5"}},
        }
        if aps:
            result["apns"]["payload"] = {"aps": aps}
        return {"message": result}

    async def _fetch_token(self) -> tuple[str, float] | DeliveryResult:
        """A new OAuth access token for the service account's signed assertion."""
        form = {"grant_type": JWT_BEARER, "assertion": assertion(self.credentials)}
        response = await self.request("POST", self.credentials.token_uri, data=form)
        if isinstance(response, DeliveryResult):
            return response
        if response.status >= 500 or response.status == 429:
            return response.failure()
        try:
            answer = response.json()
        except ValueError:
            return malformed(response.text, retryable=True)  # nothing was sent yet
        if response.status != 200 or "access_token" not in answer:
            # invalid_grant / invalid_client: the service account is wrong; retrying will not help.
            return rejected(str(answer.get("error") or f"token_http_{response.status}"), response.text)
        return str(answer["access_token"]), float(answer.get("expires_in", 3600)) - TOKEN_MARGIN_S

    async def send(self, message: RenderedMessage) -> DeliveryResult:
        body = self.body(message)
        # FCM caps what reaches the device (notification + data) at 4096 bytes; over it, FCM answers
        # INVALID_ARGUMENT, so it is refused here without spending a request.
        counted = json.dumps([body["message"]["notification"], body["message"]["data"]], ensure_ascii=False)
        if len(counted.encode()) > MAX_PAYLOAD_BYTES:
            return rejected("payload_too_large", f"{len(counted.encode())} bytes")
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

        async def post(token: str) -> Answer | DeliveryResult:
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json; charset=UTF-8"}
            return await self.request("POST", self.url, content=payload, headers=headers)

        def expired(answer: Answer | DeliveryResult) -> bool:
            # The access token expired or was revoked: one fresh token, one retry.
            return (
                isinstance(answer, Answer)
                and answer.status == 401
                and fcm_error(answer.text) in (None, "UNAUTHENTICATED")
            )

        answer = await self.token.call(post, expired)
        if isinstance(answer, DeliveryResult):
            return answer
        if not answer.ok:
            code = fcm_error(answer.text)
            return answer.failure(code=code, transient=code in RETRYABLE)
        try:
            return accepted(str(answer.json()["name"]), answer.text)
        except (ValueError, KeyError, TypeError):
            return malformed(answer.text)  # FCM has no idempotency key: a resend could notify twice
