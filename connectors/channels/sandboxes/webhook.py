"""Sandbox for the generic webhook provider: checks our signature like a careful receiver,
answers with an id, and posts a signed delivery receipt back to Loopcast — a batch of messages
(`{"messages": [...]}`) is answered with one result each and receipted in one callback."""

from __future__ import annotations

import json
import time

from aiohttp import web

from connectors.channels.sandboxes.core import Received, Sandbox, SandboxContext
from connectors.channels.webhook import SIGNATURE_HEADER, sign, verify


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    secret, receipt_url = ctx.credentials.secret.get_secret_value(), ctx.receipt_url

    async def post_receipt(body: bytes) -> None:
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body, int(time.time()))}
        async with box.client().post(receipt_url, data=body, headers=headers) as response:
            if response.status >= 300:
                raise RuntimeError(f"receipt endpoint answered {response.status}")

    def receipt(item: Received, status: str) -> dict:
        return {"id": item.provider_message_id, "status": status, "ts": int(time.time() * 1000)}

    async def send_receipt(item: Received, status: str) -> None:
        await post_receipt(json.dumps(receipt(item, status)).encode())

    async def send_receipts(fates: list[tuple[Received, str]]) -> None:
        await post_receipt(json.dumps({"receipts": [receipt(item, status) for item, status in fates]}).encode())

    async def receive(request: web.Request) -> web.Response:
        raw = await request.read()
        if not verify(secret, raw, request.headers.get(SIGNATURE_HEADER)):
            box.rejected += 1
            return web.json_response({"error": "invalid signature"}, status=401)
        injected = await box.inject()
        if injected is not None:
            return injected
        try:
            body = json.loads(raw)
        except ValueError:
            box.rejected += 1
            return web.json_response({"error": "body is not JSON"}, status=400)
        if isinstance(body, dict) and isinstance(body.get("messages"), list):
            items = [box.record(m, m.get("triggered_at")) for m in body["messages"]]
            box.schedule_receipts(items, send_receipts)
            return web.json_response({"results": [{"id": i.provider_message_id, "status": "accepted"} for i in items]})
        item = box.record(body, body.get("triggered_at"))
        box.schedule_receipt(item, send_receipt)
        return web.json_response({"id": item.provider_message_id, "status": "accepted"})

    return [web.post("/{hook:.*}", receive)]
