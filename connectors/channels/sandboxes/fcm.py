"""Sandbox for FCM HTTP v1, standing in for both oauth2.googleapis.com (/token: verifies the service account's
RS256 assertion with its public key) and fcm.googleapis.com (checks the Bearer token it issued).

The send endpoint is served over HTTP/2 + TLS on sandbox_port + 3 (sandboxes.http2; the adapter trusts the
sandboxes' certificate through options.ca_file), as fcm.googleapis.com serves it, and over HTTP/1.1 under
/fcm; both run one handler. The token endpoint stays HTTP/1.1 under /fcm (Google's is another host).

Sandbox conventions: a device token starting with "unregistered" is answered 404 UNREGISTERED, as FCM does
for an app that was uninstalled; tokens expire after `TOKEN_TTL_S`.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jwt
from aiohttp import web

from connectors.channels.devkeys import public_key_pem
from connectors.channels.fcm import FCM_ERROR_TYPE, JWT_BEARER, SCOPE
from connectors.channels.sandboxes import http2
from connectors.channels.sandboxes.core import Sandbox, SandboxContext
from connectors.channels.sandboxes.http2 import Answer, Handle

# sandbox_port + 1 is SMTP, + 2 APNs.
PORT_OFFSET = 3
SEND_PATH = re.compile(r"/v1/projects/([^/]+)/messages:send")
TOKEN_TTL_S = 3599

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED"}


def h2_port(settings) -> int:
    return settings.sandbox_port + PORT_OFFSET


def _google_error(status: int, message: str, error_code: str | None, canonical: str | None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": message, "status": canonical or _STATUS.get(status, "INTERNAL")}
    if error_code:
        error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": error_code}]
    return {"error": error}


def google_error(status: int, message: str, error_code: str | None = None, canonical: str | None = None) -> Answer:
    body = json.dumps(_google_error(status, message, error_code, canonical)).encode()
    return status, {"content-type": "application/json; charset=UTF-8"}, body


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        error = _google_error(429, "Quota exceeded for quota metric 'Send requests'.", "QUOTA_EXCEEDED", None)
    elif fault == "outage":
        error = _google_error(503, "The service is currently unavailable.", "UNAVAILABLE", "UNAVAILABLE")
    else:
        error = _google_error(500, "Internal error encountered.", "INTERNAL", "INTERNAL")
    return web.json_response(error, status=status)


def issued_tokens(box: Sandbox) -> dict[str, float]:
    """Access token → expiry: issued by the HTTP/1.1 token route, checked by both send transports."""
    return box.state.setdefault("issued", {})


def handler(box: Sandbox, ctx: SandboxContext) -> Handle:
    issued = issued_tokens(box)

    async def handle(
        method: str, path: str, headers: Mapping[str, str], body: bytes, version: str, connection: str | None
    ) -> Answer:
        match = SEND_PATH.fullmatch(path.split("?", 1)[0])
        if match is None or method != "POST":
            return google_error(404, "Requested entity was not found.")
        project = match.group(1)
        auth = headers.get("authorization", "")
        bearer = auth[7:] if auth.startswith("Bearer ") else ""
        if issued.get(bearer, 0) < time.time():
            box.rejected += 1
            return google_error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
                "other valid authentication credential.",
            )
        injected = await box.inject(answer)
        if injected is not None:
            return http2.answer_of(injected)
        try:
            message = json.loads(body)["message"]
            device = message["token"]
        except (ValueError, KeyError, TypeError):
            return google_error(400, "Recipient of the message is not set.", "INVALID_ARGUMENT")
        if not isinstance(device, str) or not device:
            return google_error(400, "The registration token is not a valid FCM registration token", "INVALID_ARGUMENT")
        if device.startswith("unregistered"):
            return google_error(404, "Requested entity was not found.", "UNREGISTERED")
        data = message.get("data") or {}
        if not isinstance(data, dict) or any(not isinstance(v, str) for v in data.values()):
            return google_error(400, "Invalid value at 'message.data': values must be strings", "INVALID_ARGUMENT")
        recorded = {"message_id": data.get("message_id"), "project": project, **message}
        # How it arrived: the HTTP version, and which HTTP/2 connection carried it (multiplexing shows here).
        recorded |= {"http_version": version, "connection": connection}
        item = box.record(json.loads(json.dumps(recorded)), None)
        name = json.dumps({"name": f"projects/{project}/messages/{item.provider_message_id}"}).encode()
        return 200, {"content-type": "application/json; charset=UTF-8"}, name

    return handle


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    credentials = ctx.credentials
    public_key = public_key_pem(credentials.private_key.get_secret_value())
    issued = issued_tokens(box)
    handle = handler(box, ctx)

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != JWT_BEARER:
            box.rejected += 1
            return web.json_response(
                {"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}, status=400
            )
        try:
            claims = jwt.decode(
                str(form.get("assertion", "")),
                public_key,
                algorithms=["RS256"],
                audience=credentials.token_uri,
                issuer=credentials.client_email,
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.InvalidTokenError as exc:
            box.rejected += 1
            return web.json_response({"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"}, status=400)
        if SCOPE not in str(claims.get("scope", "")).split():
            box.rejected += 1
            return web.json_response({"error": "invalid_scope", "error_description": "Invalid OAuth scope"}, status=400)
        access_token = "ya29.sandbox-" + secrets.token_urlsafe(24)
        issued[access_token] = time.time() + TOKEN_TTL_S
        return web.json_response({"access_token": access_token, "expires_in": TOKEN_TTL_S, "token_type": "Bearer"})

    async def send(request: web.Request) -> web.Response:
        path = f"/v1/projects/{request.match_info['project']}/messages:send"
        reply = await handle(request.method, path, request.headers, await request.read(), "1.1", None)
        return http2.http1_response(reply)

    return [web.post("/token", token), web.post("/v1/projects/{project}/messages:send", send)]


async def serve(box: Sandbox, ctx: SandboxContext) -> Callable[[], Awaitable[None]]:
    """fcm.googleapis.com's transport: HTTP/2 over TLS on sandbox_port + 3."""
    return await http2.serve(handler(box, ctx), ctx.settings, PORT_OFFSET)
