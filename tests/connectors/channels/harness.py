"""One harness for every provider's test file: the provider's sandbox on a free loopback port,
a receipt endpoint that parses callbacks with the adapter's own `parse_receipts`, and adapters
pointed at the sandbox by configuration only (the channel's url).

    async with ProviderHarness("twilio", tmp_path) as h:
        adapter = h.adapter(format="sms")
        result = await adapter.send(h.message(address="+15550100"))
        [receipt] = await h.receipts(1)
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from connectors.channels.base import (
    ChannelAdapter,
    DeliveryResult,
    Receipt,
    ReceiptRejected,
    ReceiptRequest,
    adapter_class,
)
from connectors.channels.sandboxes import build_app
from connectors.channels.sandboxes.core import Sandbox
from infra.settings import Settings
from schemas.config import Channel
from schemas.models import Priority, RenderedMessage
from tests.ports import free_port, free_port_block


def message(**overrides: Any) -> RenderedMessage:
    fields: dict[str, Any] = {
        "message_id": "m1",
        "campaign_id": "c1",
        "user_id": "u1",
        "channel": "ch",
        "priority": Priority.high,
        "triggered_at": datetime(2026, 1, 1, tzinfo=UTC),
        "address": "u1",
        "title": "Flash sale",
        "body": "你好 — only 3 left",
        "link": "http://127.0.0.1/c/abc",
    }
    return RenderedMessage(**{**fields, **overrides})


def assert_refuses_batch_max(
    scheme: str, value: str, channel_format: str, options: dict[str, str] | None = None
) -> None:
    """A `batch_max` the provider's batch call cannot take fails when the adapter is made, not at a send."""
    cls = adapter_class(scheme)
    channel = Channel(id="ch", provider=scheme, format=channel_format, options={**(options or {}), "batch_max": value})
    with pytest.raises(ValueError, match="batch_max"):
        cls(channel, cls.Credentials())


class ProviderHarness:
    def __init__(self, scheme: str, home: Path, **settings: Any) -> None:
        self.scheme = scheme
        self.cls: type[ChannelAdapter] = adapter_class(scheme)
        http_port = free_port()
        sandbox_port = free_port_block(4, avoid={http_port})
        self.settings = Settings(home=home, http_port=http_port, sandbox_port=sandbox_port, **settings)
        self.credentials = self.cls.credentials_from(self.settings)
        self.parsed: list[Receipt] = []
        self.refused: list[ReceiptRejected] = []
        self._adapters: list[ChannelAdapter] = []
        self._runners: list[web.AppRunner] = []
        self._arrived = asyncio.Condition()

    @property
    def box(self) -> Sandbox:
        return self.boxes[self.scheme]

    @property
    def base_url(self) -> str:
        return f"{self.settings.sandbox_base}/{self.scheme}"

    def message(self, **overrides: Any) -> RenderedMessage:
        return message(**overrides)

    def adapter(self, credentials: Any = None, **channel: Any) -> ChannelAdapter:
        """An adapter for a channel whose url is the sandbox; other credentials to test auth failures."""
        config = {"id": "ch", "provider": self.scheme, "url": self.base_url, **channel}
        adapter = self.cls(Channel(**config), credentials if credentials is not None else self.credentials)
        self._adapters.append(adapter)
        return adapter

    async def send_together(self, adapter: ChannelAdapter, messages: list[RenderedMessage]) -> list[DeliveryResult]:
        """The messages sent at the same moment (one loop turn: what a batching adapter puts in one call)."""
        return list(await asyncio.gather(*(adapter.send(m) for m in messages)))

    async def receipts(self, count: int, timeout_s: float = 10) -> list[Receipt]:
        """Wait until `count` receipts were parsed (a deadline, not a sleep)."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.parsed) >= count), timeout_s)
        return list(self.parsed)

    async def _receipt(self, request: web.Request) -> web.Response:
        call = ReceiptRequest(
            method=request.method,
            url=str(request.url),
            headers=request.headers,
            body=await request.read(),
            query=request.query,
        )
        try:
            parsed = self.cls.parse_receipts(self.credentials, call)
        except ReceiptRejected as exc:
            self.refused.append(exc)
            return web.json_response({"ok": False}, status=exc.status)
        async with self._arrived:
            self.parsed.extend(parsed)
            self._arrived.notify_all()
        status, body, content_type = self.cls.receipt_answer()
        return web.Response(status=status, text=body, content_type=content_type)

    async def __aenter__(self) -> ProviderHarness:
        sandbox_app, self.boxes = build_app(self.settings, [self.scheme])
        self.box.faults.receipt_delay_ms = 10
        receiver = web.Application()
        receiver.add_routes(
            [web.post(f"/receipts/{self.scheme}", self._receipt), web.get(f"/receipts/{self.scheme}", self._receipt)]
        )
        for app, port in ((sandbox_app, self.settings.sandbox_port), (receiver, self.settings.http_port)):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self._runners.append(runner)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for adapter in self._adapters:
            await adapter.close()
        for runner in reversed(self._runners):
            await runner.cleanup()


def send_once(
    scheme: str,
    home: Path,
    *,
    faults: dict[str, Any] | None = None,
    credentials: Any = None,
    message: dict[str, Any] | None = None,
    **channel: Any,
) -> tuple[DeliveryResult, Sandbox]:
    """A case-table row's one send: the sandbox with `faults`, an adapter for `channel` with `credentials`
    (other Credentials, a dict of changes to the harness's, or None for the harness's own) and a message
    with the `message` overrides. Returns the result and the sandbox, to look at what arrived."""

    async def run() -> tuple[DeliveryResult, Sandbox]:
        async with ProviderHarness(scheme, home) as h:
            h.box.faults = h.box.faults.model_copy(update=faults or {})
            given = h.credentials.model_copy(update=credentials) if isinstance(credentials, dict) else credentials
            return await h.adapter(given, **channel).send(h.message(**(message or {}))), h.box

    return asyncio.run(run())


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
