"""Sandbox for a Web Push service (autopush-style errors) that also plays the browser: it verifies the VAPID
token (aud = its own origin, exp within 24 h, signed by the key in k=) and decrypts each aes128gcm payload with
the subscription's private key, which never leaves the sandbox.

Test hooks: POST /_subscriptions makes a subscription and returns its PushSubscription JSON;
POST /_subscriptions/{id}/expire makes its endpoint answer 410 Gone.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass

import http_ece
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from connectors.channels.sandboxes.core import Sandbox, SandboxContext
from connectors.channels.webpush import b64url, b64url_decode, raw_public_key


@dataclass
class Subscription:
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    application_server_key: str  # the VAPID public key the browser subscribed with (b64url point)
    expired: bool = False


def autopush_error(status: int, errno: int, message: str) -> web.Response:
    reasons = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 410: "Gone", 413: "Payload Too Large"}
    reason = reasons.get(status, {429: "Too Many Requests", 503: "Service Unavailable"}.get(status, "Error"))
    body = {"code": status, "errno": errno, "error": reason, "message": message}
    return web.json_response(body, status=status)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        return autopush_error(429, 999, "Too many requests")
    if fault == "outage":
        return autopush_error(503, 201, "Service unavailable")
    return autopush_error(500, 999, "Internal server error")


def vapid_fields(header: str) -> dict[str, str]:
    scheme, _, params = header.partition(" ")
    if scheme.lower() != "vapid":
        return {}
    return dict(part.strip().split("=", 1) for part in params.split(",") if "=" in part)


def verify_vapid(header: str, audience: str, now: float | None = None) -> str | None:
    """None when the VAPID Authorization verifies for `audience`, else why not."""
    fields = vapid_fields(header)
    if not fields:
        return "missing vapid authorization"
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(fields["k"]))
        claims = jwt.decode(
            fields["t"],
            key,
            algorithms=["ES256"],
            audience=audience,
            options={"require": ["aud", "exp", "sub"], "verify_exp": False},
        )
    except (KeyError, ValueError, jwt.InvalidTokenError) as exc:
        return f"invalid vapid token: {exc}"
    now = now or time.time()
    if claims["exp"] <= now:
        return "vapid token expired"
    if claims["exp"] > now + 24 * 3600:
        return "vapid exp is more than 24 hours away"
    if not str(claims["sub"]).startswith(("mailto:", "https:")):
        return "vapid sub must be a mailto: or https: URL"
    return None


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    subscriptions: dict[str, Subscription] = {}
    vapid_key = serialization.load_pem_private_key(ctx.credentials.vapid_private_key.get_secret_value().encode(), None)
    our_key = b64url(raw_public_key(vapid_key.public_key()))

    async def subscribe(request: web.Request) -> web.Response:
        """pushManager.subscribe(): bound to an applicationServerKey (default: the configured VAPID key)."""
        wanted = (await request.json()) if request.can_read_body else {}
        sub_id = uuid.uuid4().hex
        key = ec.generate_private_key(ec.SECP256R1())
        subscriptions[sub_id] = Subscription(key, os.urandom(16), wanted.get("applicationServerKey") or our_key)
        return web.json_response(
            {
                "endpoint": f"{request.scheme}://{request.host}/{ctx.scheme}/push/{sub_id}",
                "expirationTime": None,
                "keys": {
                    "p256dh": b64url(raw_public_key(key.public_key())),
                    "auth": b64url(subscriptions[sub_id].auth),
                },
            },
            status=201,
        )

    async def expire(request: web.Request) -> web.Response:
        subscription = subscriptions.get(request.match_info["sub"])
        if subscription is None:
            raise web.HTTPNotFound()
        subscription.expired = True
        return web.json_response({"ok": True})

    async def push(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        refused = verify_vapid(authorization, f"{request.scheme}://{request.host}")
        subscription = subscriptions.get(request.match_info["sub"])
        if not refused and subscription and vapid_fields(authorization)["k"] != subscription.application_server_key:
            refused = "vapid key is not the subscription's applicationServerKey"
        if refused:
            box.rejected += 1
            return autopush_error(401, 109, refused)
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        if subscription is None:
            return autopush_error(404, 102, "Request did not validate invalid token")
        if subscription.expired:
            return autopush_error(410, 106, "Request did not validate no such subscription")
        if "TTL" not in request.headers:
            return autopush_error(400, 111, "Missing TTL header")
        if request.headers.get("Content-Encoding") != "aes128gcm":
            return autopush_error(400, 110, "Unknown Content-Encoding")
        body = await request.read()
        if len(body) > 4096:
            return autopush_error(413, 104, "Data payload too large")
        try:
            plaintext = http_ece.decrypt(
                body, private_key=subscription.private_key, auth_secret=subscription.auth, version="aes128gcm"
            )
            notification = json.loads(plaintext)
        except Exception as exc:  # noqa: BLE001 - anything the browser could not read
            # A real push service forwards the record blindly and the browser drops it; here it is refused.
            return autopush_error(400, 110, f"payload does not decrypt: {exc!r}")
        item = box.record(
            {
                **notification,
                "subscription": request.match_info["sub"],
                "ttl": request.headers["TTL"],
                "urgency": request.headers.get("Urgency", "normal"),
                "topic": request.headers.get("Topic"),
            },
            None,
        )
        location = f"{request.scheme}://{request.host}/{ctx.scheme}/m/{item.provider_message_id}"
        return web.Response(status=201, headers={"Location": location, "TTL": request.headers["TTL"]})

    return [
        web.post("/_subscriptions", subscribe),
        web.post("/_subscriptions/{sub}/expire", expire),
        web.post("/push/{sub}", push),
    ]
