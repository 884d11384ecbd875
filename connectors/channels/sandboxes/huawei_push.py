"""Sandbox for Huawei Push Kit: the OAuth token endpoint (client credentials) and messages:send, answering with
Huawei's string business codes, then a receipt POSTed to the configured callback with its basic auth.

Test hook: POST /_expire_tokens makes every issued access token expired (the next send gets 80200003).
"""

from __future__ import annotations

import hmac
import json
import secrets
import time

from aiohttp import web

from connectors.channels.huawei_push import SUCCESS, TOKEN_EXPIRED, basic_auth
from connectors.channels.sandboxes.core import Received, Sandbox, SandboxContext

TOKEN_TTL_S = 3600
UNDELIVERED_STATUS = 2  # "the app is not installed on the device"


def push_error(code: str, msg: str, status: int = 400) -> web.Response:
    return web.json_response({"code": code, "msg": msg, "requestId": secrets.token_hex(12)}, status=status)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        return push_error("80100017", "Request frequency too high, please retry later", status)
    return push_error("81000001", "System inner error", status)


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    credentials = ctx.credentials
    issued: dict[str, float] = {}

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            box.rejected += 1
            return web.json_response(
                {"error": 1102, "sub_error": 20001, "error_description": "unsupported grant_type"}, status=400
            )
        secret = credentials.client_secret.get_secret_value().encode()
        if form.get("client_id") != credentials.client_id or not hmac.compare_digest(
            str(form.get("client_secret", "")).encode(), secret
        ):
            box.rejected += 1
            return web.json_response(
                {"error": 1101, "sub_error": 20356, "error_description": "invalid client_secret"}, status=400
            )
        access_token = secrets.token_urlsafe(32)
        issued[access_token] = time.time() + TOKEN_TTL_S
        return web.json_response({"access_token": access_token, "expires_in": TOKEN_TTL_S, "token_type": "Bearer"})

    async def expire_tokens(request: web.Request) -> web.Response:
        for key in issued:
            issued[key] = 0
        return web.json_response({"expired": len(issued)})

    async def send_receipt(item: Received, status: str) -> None:
        body = {
            "statuses": [
                {
                    "biTag": item.body.get("bi_tag") or "",
                    "appid": item.body["app_id"],
                    "token": item.body["device_token"],
                    "status": 0 if status == "delivered" else UNDELIVERED_STATUS,
                    "timestamp": int(time.time() * 1000),
                    "requestId": item.provider_message_id,
                }
            ]
        }
        headers = {
            "Content-Type": "application/json",
            "Authorization": basic_auth(credentials.receipt_user, credentials.receipt_token.get_secret_value()),
        }
        async with box.client().post(ctx.receipt_url, data=json.dumps(body).encode(), headers=headers) as response:
            if response.status >= 300:
                raise RuntimeError(f"receipt endpoint answered {response.status}")

    async def send(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:] if auth.startswith("Bearer ") else ""
        expires = issued.get(bearer)
        if expires is None:
            box.rejected += 1
            return push_error("80200001", "Oauth authentication error", 401)
        if expires < time.time():
            box.rejected += 1
            return push_error(TOKEN_EXPIRED, "Oauth Token expired", 401)
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        try:
            body = await request.json()
            message = body["message"]
            tokens = message["token"]
            android = message.get("android") or {}
            notification = android.get("notification") or {}
        except (ValueError, KeyError, TypeError):
            return push_error("80100003", "Illegal payload, incorrect message structure")
        if not isinstance(tokens, list) or not tokens:
            return push_error("80100003", "Illegal payload, token must be a non-empty list")
        if not notification.get("title") or not notification.get("body"):
            return push_error("80100003", "Illegal payload, title and body are required")
        if len(notification["title"]) > 40 or len(notification["body"]) > 1024:
            return push_error("80100003", "Illegal payload, title or body too long")
        if all(str(t).startswith("invalid") for t in tokens):
            return push_error("80300007", "All the tokens are invalid")
        try:
            data = json.loads(message.get("data") or "{}")
        except ValueError:
            data = {}
        item = box.record(
            {
                "message_id": data.get("message_id"),
                "app_id": request.match_info["app_id"],
                "device_token": tokens[0],
                "bi_tag": android.get("bi_tag"),
                "validate_only": body.get("validate_only", False),
                **message,
            },
            None,
        )
        if not body.get("validate_only"):
            box.schedule_receipt(item, send_receipt)
        return web.json_response({"code": SUCCESS, "msg": "Success", "requestId": item.provider_message_id})

    return [
        web.post("/oauth2/v3/token", token),
        web.post("/_expire_tokens", expire_tokens),
        web.post("/v1/{app_id}/messages:send", send),
    ]
