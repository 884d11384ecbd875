"""Sandbox for the Feishu/Lark custom bot: checks the hook id, the timestamp (within an hour) and the
signature, then the message shape and the 20 KB request cap, answering in Feishu's {code, msg} form."""

from __future__ import annotations

import json

from aiohttp import web

from connectors.channels.feishu import REQUEST_MAX, verify
from connectors.channels.sandboxes.core import Sandbox, SandboxContext


def code(value: int, msg: str, status: int = 200) -> web.Response:
    return web.json_response({"code": value, "data": {}, "msg": msg}, status=status)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        return code(11232, "frequency limited psm[lark.oapi.app_platform_runtime]appID[1]")
    if fault == "error":
        return code(9499, "internal error", status=500)
    return web.Response(status=status, text="<html><body>503 Service Temporarily Unavailable</body></html>")


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    hook_id, secret = ctx.credentials.hook_id.get_secret_value(), ctx.credentials.secret.get_secret_value()

    async def send(request: web.Request) -> web.Response:
        if request.match_info["hook_id"] != hook_id:
            box.rejected += 1
            return code(19001, "param invalid: incoming webhook access token invalid")
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return code(9499, "Bad Request", status=400)
        if not verify(secret, body.get("timestamp"), body.get("sign")):
            box.rejected += 1
            return code(19021, "sign match fail or timestamp is not within one hour from current time")
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        if len(raw) > REQUEST_MAX:
            return code(9499, "request body too large", status=400)
        msg_type = body.get("msg_type")
        if msg_type == "interactive":
            card = body.get("card")
            if not isinstance(card, dict) or not card.get("elements"):
                return code(11246, "create card content failed")
        elif msg_type == "text":
            if not (body.get("content") or {}).get("text"):
                return code(9499, "Bad Request: content.text is required", status=400)
        else:
            return code(19002, "params error, msg_type need")
        box.record(body, None)
        return web.json_response({"StatusCode": 0, "StatusMessage": "success", "code": 0, "data": {}, "msg": "success"})

    return [web.post("/open-apis/bot/v2/hook/{hook_id}", send)]
