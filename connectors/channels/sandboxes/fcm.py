"""Sandbox for FCM HTTP v1, standing in for both oauth2.googleapis.com (/token: verifies the service account's
RS256 assertion with its public key) and fcm.googleapis.com (checks the Bearer token it issued).

Sandbox conventions: a device token starting with "unregistered" is answered 404 UNREGISTERED, as FCM does
for an app that was uninstalled; tokens expire after `TOKEN_TTL_S`.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import jwt
from aiohttp import web

from connectors.channels.devkeys import public_key_pem
from connectors.channels.fcm import FCM_ERROR_TYPE, JWT_BEARER, SCOPE
from connectors.channels.sandboxes.core import Sandbox, SandboxContext

TOKEN_TTL_S = 3599

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED"}


def google_error(
    status: int, message: str, error_code: str | None = None, canonical: str | None = None
) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": canonical or _STATUS.get(status, "INTERNAL")}
    if error_code:
        error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": error_code}]
    return web.json_response({"error": error}, status=status)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        return google_error(429, "Quota exceeded for quota metric 'Send requests'.", "QUOTA_EXCEEDED")
    if fault == "outage":
        return google_error(503, "The service is currently unavailable.", "UNAVAILABLE", "UNAVAILABLE")
    return google_error(500, "Internal error encountered.", "INTERNAL", "INTERNAL")


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    credentials = ctx.credentials
    public_key = public_key_pem(credentials.private_key.get_secret_value())
    issued: dict[str, float] = {}

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
        auth = request.headers.get("Authorization", "")
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
            return injected
        try:
            message = (await request.json())["message"]
            device = message["token"]
        except (ValueError, KeyError, TypeError):
            return google_error(400, "Recipient of the message is not set.", "INVALID_ARGUMENT")
        if not isinstance(device, str) or not device:
            return google_error(400, "The registration token is not a valid FCM registration token", "INVALID_ARGUMENT")
        if device.startswith("unregistered"):
            return google_error(404, "Requested entity was not found.", "UNREGISTERED")
        data = message.get("data") or {}
        if any(not isinstance(v, str) for v in data.values()):
            return google_error(400, "Invalid value at 'message.data': values must be strings", "INVALID_ARGUMENT")
        body = {"message_id": data.get("message_id"), "project": request.match_info["project"], **message}
        item = box.record(json.loads(json.dumps(body)), None)
        return web.json_response(
            {"name": f"projects/{request.match_info['project']}/messages/{item.provider_message_id}"}
        )

    return [web.post("/token", token), web.post("/v1/projects/{project}/messages:send", send)]
