"""Sandbox for the Telegram Bot API's sendMessage: the token in the path (401 Unauthorized when wrong,
404 for an unknown method), Telegram's error bodies, 429 with parameters.retry_after, and result
messages numbered per chat as Telegram numbers them."""

from __future__ import annotations

import time
from collections import defaultdict

from aiohttp import web

from connectors.channels.sandboxes.core import Sandbox, SandboxContext, json_object

UNKNOWN_CHATS = {"0", "-1000000000404"}
BLOCKED_CHATS = {"403403403"}  # users who blocked the bot
PARSE_MODES = {"MarkdownV2", "Markdown", "HTML"}
RETRY_AFTER_S = 3


def error(code: int, description: str, **parameters: object) -> web.Response:
    body: dict[str, object] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=code)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":
        return error(429, f"Too Many Requests: retry after {RETRY_AFTER_S}", retry_after=RETRY_AFTER_S)
    if fault == "error":
        return error(500, "Internal Server Error")
    return web.Response(status=status, text="<html><body><h1>503 Service Unavailable</h1></body></html>")


def _utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    token = ctx.credentials.token.get_secret_value()
    counters: dict[str, int] = defaultdict(int)
    prefix = token.split(":", 1)[0]
    bot_id = int(prefix) if prefix.isdigit() else 0

    async def method(request: web.Request) -> web.Response:
        if request.match_info["token"] != token:
            box.rejected += 1
            return error(401, "Unauthorized")
        if request.match_info["method"].lower() != "sendmessage":
            return error(404, "Not Found")
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        body = await json_object(request)
        if body is None:
            return error(400, "Bad Request: invalid JSON")
        chat = str(body.get("chat_id") or "")
        if not chat:
            return error(400, "Bad Request: chat_id is empty")
        if chat in UNKNOWN_CHATS:
            return error(400, "Bad Request: chat not found")
        if chat in BLOCKED_CHATS:
            return error(403, "Forbidden: bot was blocked by the user")
        text = body.get("text")
        if not text:
            return error(400, "Bad Request: message text is empty")
        if _utf16(text) > 4096:
            return error(400, "Bad Request: message is too long")
        if "parse_mode" in body and body["parse_mode"] not in PARSE_MODES:
            return error(400, f"Bad Request: unsupported parse_mode {body['parse_mode']}")
        for row in (body.get("reply_markup") or {}).get("inline_keyboard") or []:
            for button in row:
                if not str(button.get("url", "")).startswith(("http://", "https://", "tg://")):
                    return error(400, "Bad Request: BUTTON_URL_INVALID")
        box.record(body, None)
        counters[chat] += 1
        chat_id: int | str = int(chat) if chat.lstrip("-").isdigit() else chat
        result = {
            "message_id": counters[chat],
            "from": {"id": bot_id, "is_bot": True, "first_name": "Loopcast"},
            "chat": {"id": chat_id, "type": "private" if isinstance(chat_id, int) and chat_id > 0 else "channel"},
            "date": int(time.time()),
            "text": text,
        }
        return web.json_response({"ok": True, "result": result})

    return [web.post("/bot{token}/{method}", method), web.get("/bot{token}/{method}", method)]
