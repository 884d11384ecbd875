"""Sandbox for Slack's chat.postMessage: checks the bot token, answers {"ok": false, "error": …} on HTTP
200 like Slack (429 + Retry-After when rate limited), and returns a channel and ts for each message."""

from __future__ import annotations

from aiohttp import web

from connectors.channels.sandboxes.core import Sandbox, SandboxContext, json_object

UNKNOWN_CHANNELS = {"C0NOTFOUND", "#nowhere"}
OUTSIDE_CHANNELS = {"C0NOTMEMBER"}  # exists, but the bot was never invited


def error(code: str, status: int = 200) -> web.Response:
    return web.json_response({"ok": False, "error": code}, status=status)


def answer(fault: str, status: int) -> web.Response:
    words = {"throttled": "ratelimited", "error": "internal_error", "outage": "service_unavailable"}
    return error(words[fault], status)


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    token = ctx.credentials.token.get_secret_value()

    async def post_message(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            box.rejected += 1
            return error("not_authed")
        if auth.removeprefix("Bearer ") != token:
            box.rejected += 1
            return error("invalid_auth")
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        body = await json_object(request)
        if body is None:
            return error("invalid_json")
        channel = body.get("channel")
        if not channel:
            return error("channel_not_found")
        if channel in UNKNOWN_CHANNELS:
            return error("channel_not_found")
        if channel in OUTSIDE_CHANNELS:
            return error("not_in_channel")
        if not body.get("text") and not body.get("blocks"):
            return error("no_text")
        if len(body.get("text") or "") > 40_000:
            return error("msg_too_long")
        item = box.record(body, None)
        ts = f"{int(item.received_at)}.{int(item.provider_message_id.rsplit('-', 1)[1]):06d}"
        message = {"type": "message", "text": body.get("text"), "ts": ts, "bot_id": "B0LOOPCAST"}
        return web.json_response({"ok": True, "channel": channel, "ts": ts, "message": message})

    return [web.post("/api/chat.postMessage", post_message)]
