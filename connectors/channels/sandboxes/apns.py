"""Sandbox for APNs: a real HTTP/2-over-TLS server (sandboxes.http2: ALPN "h2", the sandboxes' self-signed
certificate the adapter trusts through options.ca_file) on sandbox_port + 2, plus the same handler under /apns
over HTTP/1.1 for clients that cannot speak HTTP/2 (real APNs refuses HTTP/1.1; only the HTTP/2 port is faithful).

Conventions: a device token of 64 zeros is answered 410 Unregistered (the app was removed).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

import jwt
from aiohttp import web

from connectors.channels.devkeys import public_key_pem
from connectors.channels.sandboxes import http2
from connectors.channels.sandboxes.core import Sandbox, SandboxContext
from connectors.channels.sandboxes.http2 import Answer, Handle

PORT_OFFSET = 2
DEVICE_TOKEN = re.compile(r"^[0-9a-fA-F]{64}$")
UNREGISTERED = "0" * 64


def h2_port(settings) -> int:
    return settings.sandbox_port + PORT_OFFSET


def _error(status: int, reason: str, **extra: object) -> Answer:
    return status, {"content-type": "application/json"}, json.dumps({"reason": reason, **extra}).encode()


def fault_answer(fault: str, status: int) -> web.Response:
    reason = {"throttled": "TooManyRequests", "outage": "ServiceUnavailable"}.get(fault, "InternalServerError")
    return web.json_response({"reason": reason}, status=status)


def handler(box: Sandbox, ctx: SandboxContext) -> Handle:
    credentials = ctx.credentials
    public_key = public_key_pem(credentials.auth_key.get_secret_value())

    def authorise(header: str) -> str | None:
        """None when the provider token verifies, else APNs' reason."""
        if not header.lower().startswith("bearer "):
            return "MissingProviderToken"
        token = header[7:]
        try:
            if jwt.get_unverified_header(token).get("kid") != credentials.key_id:
                return "InvalidProviderToken"
            claims = jwt.decode(token, public_key, algorithms=["ES256"], options={"require": ["iss", "iat"]})
        except jwt.InvalidTokenError:
            return "InvalidProviderToken"
        if claims["iss"] != credentials.team_id:
            return "InvalidProviderToken"
        if time.time() - int(claims["iat"]) > 3600:
            return "ExpiredProviderToken"
        return None

    async def handle(
        method: str, path: str, headers: Mapping[str, str], body: bytes, version: str, connection: str | None
    ) -> Answer:
        refused = authorise(headers.get("authorization", ""))
        if refused:
            box.rejected += 1
            return _error(403, refused)
        injected = await box.inject(fault_answer)
        if injected is not None:
            return http2.answer_of(injected)
        match = re.fullmatch(r"/3/device/([^/]*)", path.split("?", 1)[0])
        if match is None:
            return _error(404, "BadPath")
        if method != "POST":
            return _error(405, "MethodNotAllowed")
        device = match.group(1)
        if not headers.get("apns-topic"):
            return _error(400, "MissingTopic")
        if headers.get("apns-push-type", "alert") not in {
            "alert",
            "background",
            "voip",
            "complication",
            "fileprovider",
        }:
            return _error(400, "InvalidPushType")
        if headers.get("apns-priority", "10") not in {"1", "5", "10"}:
            return _error(400, "BadPriority")
        given_id = headers.get("apns-id") or str(uuid.uuid4())
        try:
            uuid.UUID(given_id)
        except ValueError:
            return _error(400, "BadMessageId")
        if not DEVICE_TOKEN.match(device):
            return _error(400, "BadDeviceToken")
        if device == UNREGISTERED:
            return _error(410, "Unregistered", timestamp=int(time.time() * 1000))
        if not body:
            return _error(400, "PayloadEmpty")
        if len(body) > 4096:
            return _error(413, "PayloadTooLarge")
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "BadPayload")  # APNs' wording is looser; the status is what matters
        item = box.record(
            {
                "message_id": payload.get("message_id"),
                "device_token": device,
                "apns_id": given_id,
                "topic": headers["apns-topic"],
                "priority": headers.get("apns-priority", "10"),
                "push_type": headers.get("apns-push-type"),
                "expiration": headers.get("apns-expiration"),
                "http_version": version,
                "connection": connection,
                "payload": payload,
            },
            None,
        )
        item.provider_message_id = given_id  # APNs answers with the request's apns-id
        return 200, {"apns-id": given_id}, b""

    return handle


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    handle = handler(box, ctx)

    async def http1(request: web.Request) -> web.Response:
        path = "/3/device/" + request.match_info["token"]
        answer = await handle(request.method, path, request.headers, await request.read(), "1.1", None)
        return http2.http1_response(answer)

    return [web.route("*", "/3/device/{token}", http1)]


async def serve(box: Sandbox, ctx: SandboxContext) -> Callable[[], Awaitable[None]]:
    """The faithful transport: HTTP/2 over TLS on sandbox_port + 2."""
    return await http2.serve(handler(box, ctx), ctx.settings, PORT_OFFSET)
