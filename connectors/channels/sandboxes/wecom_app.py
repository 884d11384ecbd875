"""Sandbox for WeCom application messages: issues access tokens for the configured corpid/corpsecret,
answers sends with WeCom's errcode bodies (HTTP 200 even for errors), and checks the message shape.

`box.tokens` (token → monotonic expiry) is the live token table: clearing it makes the next send meet
42001 like a token WeCom expired early; `box.tokens_issued` counts gettoken calls.
"""

from __future__ import annotations

import json
import secrets
import time

from aiohttp import web

from connectors.channels.sandboxes.core import Sandbox, SandboxContext

INVALID_USERS = {"nobody", "invalid-user"}  # userids this sandbox's corp does not have


def errcode(code: int, message: str, status: int = 200, **more: object) -> web.Response:
    return web.json_response({"errcode": code, "errmsg": message, **more}, status=status)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        return errcode(45009, "api freq out of limit")
    if fault == "error":
        return errcode(-1, "system busy")
    return web.Response(status=status, text="<html><body>503 Service Temporarily Unavailable</body></html>")


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    corp_id, corp_secret = ctx.credentials.corp_id, ctx.credentials.corp_secret.get_secret_value()
    box.tokens = {}  # type: ignore[attr-defined]
    box.tokens_issued = 0  # type: ignore[attr-defined]

    async def gettoken(request: web.Request) -> web.Response:
        if request.query.get("corpid") != corp_id:
            box.rejected += 1
            return errcode(40013, "invalid corpid")
        if request.query.get("corpsecret") != corp_secret:
            box.rejected += 1
            return errcode(40001, "invalid credential")
        token = secrets.token_urlsafe(48)
        box.tokens[token] = time.monotonic() + 7200  # type: ignore[attr-defined]
        box.tokens_issued += 1  # type: ignore[attr-defined]
        return errcode(0, "ok", access_token=token, expires_in=7200)

    async def send(request: web.Request) -> web.Response:
        token = request.query.get("access_token")
        if not token:
            box.rejected += 1
            return errcode(41001, "access_token missing")
        expiry = box.tokens.get(token)  # type: ignore[attr-defined]
        if expiry is None or expiry < time.monotonic():
            box.rejected += 1
            return errcode(42001, "access_token expired") if expiry else errcode(40014, "invalid access_token")
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        try:
            body = json.loads(await request.read())
        except ValueError:
            return errcode(40008, "invalid message type")  # what WeCom says for an unreadable body
        msgtype = body.get("msgtype")
        if not isinstance(body.get("agentid"), int):
            return errcode(40056, "invalid agentid")
        if msgtype not in {"text", "markdown", "textcard", "news"} or not isinstance(body.get(msgtype), dict):
            return errcode(40008, "invalid message type")
        part = body[msgtype]
        if msgtype in {"text", "markdown"} and not part.get("content"):
            return errcode(44004, "empty content")
        if msgtype in {"text", "markdown"} and len(part["content"].encode()) > 2048:
            return errcode(45002, "content size out of limit")
        if msgtype == "textcard" and not (part.get("title") and part.get("description") and part.get("url")):
            return errcode(41006, "missing textcard title, description or url")
        users = str(body.get("touser") or "").split("|")
        invalid = [user for user in users if user in INVALID_USERS]
        if len(invalid) == len(users):
            return errcode(81013, "user & party & tag all invalid")
        item = box.record(body, None)
        return errcode(0, "ok", invaliduser="|".join(invalid), msgid=item.provider_message_id)

    return [web.get("/cgi-bin/gettoken", gettoken), web.post("/cgi-bin/message/send", send)]
