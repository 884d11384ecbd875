"""Sandbox for the DingTalk custom robot in signing mode: checks the access token, the timestamp
(within an hour) and the HMAC signature as DingTalk does, then the message shape."""

from __future__ import annotations

import json

from aiohttp import web

from connectors.channels.dingtalk import verify
from connectors.channels.sandboxes.core import Sandbox, SandboxContext

SIZE_LIMIT = 20_000


def errcode(code: int, message: str, status: int = 200) -> web.Response:
    return web.json_response({"errcode": code, "errmsg": message}, status=status)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        return errcode(130101, "send too fast, exceed 20 times per minute")
    if fault == "error":
        return errcode(-1, "系统繁忙")
    return web.Response(status=status, text="<html><body>503 Service Temporarily Unavailable</body></html>")


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    token, secret = ctx.credentials.access_token.get_secret_value(), ctx.credentials.secret.get_secret_value()

    async def send(request: web.Request) -> web.Response:
        if request.query.get("access_token") != token:
            box.rejected += 1
            return errcode(300001, "token is not exist")
        if not verify(secret, request.query.get("timestamp"), request.query.get("sign")):
            box.rejected += 1
            return errcode(310000, "sign not match, more: [https://ding-doc.dingtalk.com/doc#/serverapi2/qf2nxq]")
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        try:
            body = json.loads(await request.read())
        except ValueError:
            return errcode(40035, "缺少参数 json")
        msgtype = body.get("msgtype")
        part = body.get(msgtype) if isinstance(msgtype, str) else None
        if msgtype not in {"text", "markdown", "actionCard", "link"} or not isinstance(part, dict):
            return errcode(40035, "不合法的参数: msgtype")
        text = part.get("content") if msgtype == "text" else part.get("text")
        if not text or (msgtype != "text" and not part.get("title")):
            return errcode(40035, "缺少参数 text/title")
        if msgtype == "actionCard" and not (part.get("singleURL") or part.get("btns")):
            return errcode(40035, "缺少参数 singleURL")
        if len(json.dumps(part, ensure_ascii=False).encode()) > SIZE_LIMIT + 1024:
            return errcode(460101, "message too long, exceed 20000 bytes")
        box.record(body, None)
        return errcode(0, "ok")

    return [web.post("/robot/send", send)]
