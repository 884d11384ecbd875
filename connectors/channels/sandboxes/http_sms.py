"""Sandbox for the generic HTTP SMS gateway: checks the API key and the shared HMAC signature (the adapter's own
signing function: it is our protocol), answers {id, status: queued}, and posts signed DLRs to Loopcast."""

from __future__ import annotations

import json
import re

from aiohttp import web

from connectors.channels.http_sms import KEY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, signed_headers, verify
from connectors.channels.sandboxes.core import Received, Sandbox, SandboxContext

PHONE = re.compile(r"^\+?\d{7,15}$")


def error(code: str, message: str, status: int) -> web.Response:
    return web.json_response({"status": "error", "error": code, "message": message}, status=status)


def answer(fault: str, status: int) -> web.Response:
    code, message = {
        "outage": ("unavailable", "gateway temporarily unavailable"),
        "throttled": ("rate_limited", "too many requests"),
        "error": ("internal_error", "internal error"),
    }[fault]
    return error(code, message, status)


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    api_key, secret = ctx.credentials.api_key, ctx.credentials.api_secret.get_secret_value()

    async def send_receipt(item: Received, status: str) -> None:
        ok = status == "delivered"
        dlr = {"id": item.provider_message_id, "status": "DELIVRD" if ok else "UNDELIV", "err": "000" if ok else "001"}
        body = json.dumps(dlr).encode()
        async with box.client().post(ctx.receipt_url, data=body, headers=signed_headers(api_key, secret, body)) as r:
            if r.status >= 300:
                raise RuntimeError(f"DLR endpoint answered {r.status}")

    async def send(request: web.Request) -> web.Response:
        raw = await request.read()
        if request.headers.get(KEY_HEADER) != api_key:
            box.rejected += 1
            return error("invalid_api_key", "unknown API key", 403)
        if not verify(secret, raw, request.headers.get(TIMESTAMP_HEADER), request.headers.get(SIGNATURE_HEADER)):
            box.rejected += 1
            return error("invalid_signature", "signature does not verify or timestamp is stale", 401)
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return error("invalid_json", "body is not a JSON object", 400)
        if not PHONE.match(str(body.get("to") or "")):
            return error("invalid_number", f"not a phone number: {body.get('to')!r}", 400)
        if not body.get("text"):
            return error("missing_text", "text is required", 400)
        item = box.record({**body, "message_id": body.get("ref")}, None)
        box.schedule_receipt(item, send_receipt)
        return web.json_response({"id": item.provider_message_id, "status": "queued"})

    return [web.post("/{path:.*}", send)]
