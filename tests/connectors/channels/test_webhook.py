"""The webhook adapter against its sandbox over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime

import pytest
from aiohttp import web
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, adapter_class
from connectors.channels.sandboxes import build_app
from connectors.channels.webhook import SIGNATURE_HEADER, WebhookAdapter, sign, verify
from infra.settings import Settings
from schemas.config import Channel
from schemas.models import Priority, RenderedMessage

pytestmark = pytest.mark.integration

SECRET = "test-secret"
MESSAGE = RenderedMessage(
    message_id="m1",
    campaign_id="c1",
    user_id="u1",
    channel="webhook",
    priority=Priority.high,
    triggered_at=datetime(2026, 1, 1, tzinfo=UTC),
    address="u1",
    title="T",
    body="你好",
    link="http://x/c/1",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("secret", "body", "shift_s", "ok"),
    [(SECRET, b"{}", 0, True), ("other", b"{}", 0, False), (SECRET, b"{} ", 0, False), (SECRET, b"{}", 3600, False)],
)
def test_signature(secret, body, shift_s, ok) -> None:
    header = sign(secret, b"{}", 1_700_000_000)
    assert verify(SECRET, body, header, now=1_700_000_000 + shift_s) is ok


def test_registry_finds_the_webhook() -> None:
    assert adapter_class("webhook") is WebhookAdapter
    with pytest.raises(LookupError):
        adapter_class("carrier-pigeon")


async def _scenario() -> dict:
    receipts: list[tuple[bytes, str | None]] = []
    got_receipt = asyncio.Event()

    async def receipt(request: web.Request) -> web.Response:
        receipts.append((await request.read(), request.headers.get(SIGNATURE_HEADER)))
        got_receipt.set()
        return web.json_response({"ok": True})

    http_port, sandbox_port = free_port(), free_port()
    settings = Settings(http_port=http_port, sandbox_port=sandbox_port, webhook_secret=SecretStr(SECRET))
    sandbox_app, boxes = build_app(settings)
    receiver = web.Application()
    receiver.add_routes([web.post("/receipts/webhook", receipt)])
    runners = [web.AppRunner(sandbox_app), web.AppRunner(receiver)]
    for runner, port in zip(runners, (sandbox_port, http_port), strict=True):
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    channel = Channel(id="webhook", provider="webhook", url=f"http://127.0.0.1:{sandbox_port}/webhook/app")
    good = WebhookAdapter(channel, WebhookAdapter.Credentials(secret=SecretStr(SECRET)))
    forged = WebhookAdapter(channel, WebhookAdapter.Credentials(secret=SecretStr("wrong")))
    box = boxes["webhook"]
    box.faults.receipt_delay_ms = 10
    try:
        results = {"accepted": await good.send(MESSAGE), "forged": await forged.send(MESSAGE)}
        await asyncio.wait_for(got_receipt.wait(), timeout=10)
        box.faults.outage = True
        results["outage"] = await good.send(MESSAGE)
        box.faults.outage = False
        box.faults.throttle_rate = 1.0
        results["throttled"] = await good.send(MESSAGE)
        results["received"] = [r.body for r in box.received]
        results["rejected"] = box.rejected
        results["receipts"] = receipts
    finally:
        await good.close()
        await forged.close()
        for runner in runners:
            await runner.cleanup()
    return results


def test_adapter_against_sandbox() -> None:
    r = asyncio.run(_scenario())
    assert r["accepted"].status is DeliveryStatus.accepted and r["accepted"].provider_message_id == "webhook-0000000001"
    assert r["forged"].status is DeliveryStatus.failed and r["forged"].error_code == "http_401"
    assert not r["forged"].retryable
    assert (r["outage"].error_code, r["outage"].retryable) == ("http_503", True)
    assert (r["throttled"].error_code, r["throttled"].retryable) == ("http_429", True)
    # Only the correctly signed request arrived; the forged one was counted as rejected.
    assert [b["message_id"] for b in r["received"]] == ["m1"] and r["received"][0]["body"] == "你好"
    assert r["rejected"] == 1
    [(body, header)] = r["receipts"]
    assert verify(SECRET, body, header) and b'"status": "delivered"' in body


@pytest.mark.unit
def test_credentials_come_from_settings() -> None:
    credentials = WebhookAdapter.credentials_from(Settings(webhook_secret=SecretStr("from-env")))
    assert credentials.secret.get_secret_value() == "from-env"
