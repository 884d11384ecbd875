"""Sandbox for Xiaomi Mi Push (/v3/message/regid): checks `Authorization: key=<AppSecret>` and the form like
Xiaomi, answers in its {"result", "code", "data"} shape, and POSTs the receipt (form field `data`) to the
message's own extra.callback URL, unsigned, as Xiaomi does.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time

from aiohttp import web

from connectors.channels.sandboxes.core import Received, Sandbox, SandboxContext

INVALID_TARGET = 16


def xiaomi_error(code: int, reason: str, description: str, status: int = 200) -> web.Response:
    body = {"result": "error", "reason": reason, "trace_id": secrets.token_hex(10), "code": code}
    body["description"] = description
    return web.json_response(body, status=status)


def answer(fault: str, status: int) -> web.Response:
    # Xiaomi reports its own throttling in the body of a 200; outages are real 5xx.
    if fault == "throttled":
        return xiaomi_error(10027, "App API call too frequent", "应用的API调用太频繁")
    return xiaomi_error(10002, "System busy", "系统繁忙", status)


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    secret = ctx.credentials.app_secret.get_secret_value().encode()

    async def send_receipt(item: Received, status: str) -> None:
        form = item.body
        kind = 1 if status == "delivered" else INVALID_TARGET
        if not int(form.get("extra.callback.type", "0")) & kind:
            return  # the message did not ask for this kind of report
        report = {
            item.provider_message_id: {
                "param": form.get("extra.callback.param", ""),
                "type": kind,
                "targets": form["registration_id"],
                "jobkey": "",
                "barStatus": "Enable",
                "timestamp": int(time.time() * 1000),
            }
        }
        async with box.client().post(form["extra.callback"], data={"data": json.dumps(report)}) as response:
            if response.status >= 300:
                raise RuntimeError(f"receipt endpoint answered {response.status}")

    async def regid(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "")
        if not given.startswith("key=") or not hmac.compare_digest(given[4:].encode(), secret):
            box.rejected += 1
            return xiaomi_error(21301, "Authentication failed", "认证失败", 401)
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        form = {k: str(v) for k, v in (await request.post()).items()}
        for required in ("registration_id", "restricted_package_name", "payload"):
            if not form.get(required):
                return xiaomi_error(21305, f"missing required parameter: {required}", "缺少必要的参数")
        if not form.get("title") or not form.get("description"):
            return xiaomi_error(10017, "title and description are required", "参数值非法")
        if len(form["title"]) >= 50 or len(form["description"]) >= 128:
            return xiaomi_error(10017, "title or description too long", "参数值非法")
        if form.get("pass_through") not in (None, "0", "1"):
            return xiaomi_error(10017, "invalid pass_through", "参数值非法")
        try:
            payload = json.loads(form["payload"])
        except ValueError:
            payload = {}
        item = box.record({"message_id": payload.get("message_id"), **form}, None)
        item.provider_message_id = f"slm{secrets.token_hex(10)}"  # Xiaomi's message ids look like this
        if form.get("extra.callback"):
            box.schedule_receipt(item, send_receipt)
        return web.json_response(
            {
                "result": "ok",
                "trace_id": secrets.token_hex(10),
                "code": 0,
                "data": {"id": item.provider_message_id},
                "description": "成功",
                "info": "Received push messages for 1 REGID",
            }
        )

    return [web.post("/v3/message/regid", regid)]
