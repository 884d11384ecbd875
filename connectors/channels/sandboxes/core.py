"""What every provider sandbox shares: a record of what arrived, fault injection (latency, error
rate, 429 throttling, outage) and receipts pushed back to Loopcast after a delay.

Inspection lives under /_sandbox/ so tests, the demo and the benchmark count what really
arrived instead of trusting our own logs.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, Field


class Faults(BaseModel):
    latency_ms: float = Field(default=0, ge=0)
    error_rate: float = Field(default=0, ge=0, le=1)
    throttle_rate: float = Field(default=0, ge=0, le=1)
    outage: bool = False
    # Share of requests answered 200 with a body the provider's client cannot parse.
    malformed_rate: float = Field(default=0, ge=0, le=1)
    # Share of accepted messages whose receipt says the handset never got it.
    undelivered_rate: float = Field(default=0, ge=0, le=1)
    receipt_delay_ms: float = Field(default=200, ge=0)
    # Off when nobody listens for receipts (a dispatch-only benchmark worker serves no HTTP).
    receipts: bool = True
    seed: int | None = None


FaultAnswer = Callable[[str, int], web.Response]


def server_closer(server: asyncio.Server, connections: Iterable[asyncio.Protocol]) -> Callable[[], Awaitable[None]]:
    """The async close a sandbox's `serve` hook hands back for a server of its own (SMTP, HTTP/2): no new
    connections, the open ones dropped (a client holding one open would keep `wait_closed` waiting)."""

    async def close() -> None:
        server.close()
        for connection in list(connections):
            if getattr(connection, "transport", None) is not None:
                connection.transport.close()
        await server.wait_closed()

    return close


def default_answer(fault: str, status: int) -> web.Response:
    messages = {"outage": "service unavailable", "throttled": "rate limited", "error": "internal error"}
    return web.json_response({"error": messages[fault]}, status=status)


async def json_object(request: web.Request) -> dict[str, Any] | None:
    """The request's body as a JSON object; None when it is not one (the provider answers its own 400)."""
    try:
        body = json.loads(await request.read())
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


@dataclass(frozen=True)
class SandboxContext:
    """What a provider's sandbox needs to know: the credentials it verifies (the same ones the
    adapter signs with, from the same settings), where Loopcast takes its receipts, and the
    settings themselves (home, ports)."""

    scheme: str
    credentials: Any
    receipt_url: str
    settings: Any

    @property
    def base_url(self) -> str:
        """The sandbox's stand-in for the provider's API root: a channel's `url` points here."""
        return f"{self.settings.sandbox_base}/{self.scheme}"


@dataclass
class Received:
    provider: str
    provider_message_id: str
    received_at: float
    body: dict[str, Any]
    receipt_status: str | None = None
    receipt_acknowledged: bool = False


def message_key(item: Received) -> str:
    """Which message a request carried: our message id where the protocol carries one; else (a batch call
    with no per-recipient id, as SendBatchSms and multi-number SendSms are) what the recipient got, which a
    redelivery of the same message repeats."""
    given = item.body.get("message_id")
    return str(given) if given else json.dumps(item.body, sort_keys=True, ensure_ascii=False, default=str)


@dataclass
class Sandbox:
    """State of one provider's sandbox; the provider module supplies its routes."""

    provider: str
    faults: Faults = field(default_factory=Faults)
    received: list[Received] = field(default_factory=list)
    rejected: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    # When injected faults answered (outage, throttling, errors): how long a provider kept being tried.
    faulted: int = 0
    last_fault_at: float | None = None
    rng: random.Random = field(default_factory=random.Random)
    # A provider's own state shared by its routes and its `serve` hook (FCM: the access tokens it issued).
    state: dict[str, Any] = field(default_factory=dict)
    _seq: int = 0
    _pending: set = field(default_factory=set)
    _client: aiohttp.ClientSession | None = None

    def client(self) -> aiohttp.ClientSession:
        """For calls back to Loopcast (receipts), opened on first use."""
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        return self._client

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        if self._client is not None:
            await self._client.close()

    def next_id(self) -> str:
        self._seq += 1
        return f"{self.provider}-{self._seq:010d}"

    async def inject(self, answer: FaultAnswer | None = None) -> web.Response | None:
        """Apply configured faults; a response returned here is what the provider would answer.
        `answer(fault, status)` renders it in the provider's own error format."""
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        fault = None
        if self.faults.outage:
            fault, status = "outage", 503
        elif self.faults.throttle_rate and self.rng.random() < self.faults.throttle_rate:
            fault, status = "throttled", 429
        elif self.faults.error_rate and self.rng.random() < self.faults.error_rate:
            fault, status = "error", 500
        elif self.faults.malformed_rate and self.rng.random() < self.faults.malformed_rate:
            return web.Response(text="<html><body>502 upstream glitch</body></html>", content_type="text/html")
        if fault is None:
            return None
        self.faulted, self.last_fault_at = self.faulted + 1, time.time()
        response = (answer or default_answer)(fault, status)
        if fault == "throttled" and "Retry-After" not in response.headers:
            response.headers["Retry-After"] = "1"
        return response

    def record(self, body: dict[str, Any], triggered_at_ms: int | None) -> Received:
        now = time.time()
        item = Received(self.provider, self.next_id(), now, body)
        self.received.append(item)
        if triggered_at_ms:
            self.latencies_ms.append(now * 1000 - triggered_at_ms)
        return item

    def _fate(self, item: Received) -> str:
        # With a seed, a message's fate depends on the seed and its id alone, so a rerun (or a
        # redelivery) meets the same fate; without one, each send rolls afresh.
        key = message_key(item)
        roll = (
            random.Random(f"{self.faults.seed}:{key}").random() if self.faults.seed is not None else self.rng.random()
        )
        return "undelivered" if roll < self.faults.undelivered_rate else "delivered"

    def schedule_receipt(self, item: Received, send: Callable[[Received, str], Awaitable[None]]) -> None:
        status = self._fate(item)
        if self.faults.receipts:
            item.receipt_status = status
            self._later([item], lambda: send(item, status))

    def schedule_receipts(
        self, items: list[Received], send_many: Callable[[list[tuple[Received, str]]], Awaitable[None]]
    ) -> None:
        """Receipts for many messages as one callback, as providers that batch their reports do."""
        fates = [(item, self._fate(item)) for item in items]
        if self.faults.receipts and fates:
            for item, status in fates:
                item.receipt_status = status
            self._later(items, lambda: send_many(fates))

    def _later(self, items: list[Received], send: Callable[[], Awaitable[None]]) -> None:
        async def later() -> None:
            await asyncio.sleep(self.faults.receipt_delay_ms / 1000)
            for attempt in range(5):
                try:
                    await send()
                    for item in items:
                        item.receipt_acknowledged = True
                    return
                except Exception:  # noqa: BLE001 - a provider retries receipts; so do we
                    await asyncio.sleep(0.2 * 2**attempt)

        task = asyncio.ensure_future(later())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def reset(self) -> None:
        self.received.clear()
        self.latencies_ms.clear()
        self.faulted, self.last_fault_at = 0, None
        self.rejected = 0

    def stats(self) -> dict[str, Any]:
        latencies = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2) if latencies else None

        return {
            "provider": self.provider,
            "received": len(self.received),
            "unique_messages": len({message_key(r) for r in self.received}),
            "rejected": self.rejected,
            "receipts": sum(1 for r in self.received if r.receipt_status),
            "receipts_acknowledged": sum(1 for r in self.received if r.receipt_acknowledged),
            "latency_ms": {
                "p50": pct(0.5),
                "p90": pct(0.9),
                "p99": pct(0.99),
                "max": latencies[-1] if latencies else None,
            },
            "faulted": self.faulted,
            "last_fault_at": self.last_fault_at,
            "first_at": self.received[0].received_at if self.received else None,
            "last_at": self.received[-1].received_at if self.received else None,
            "faults": self.faults.model_dump(),
        }


def inspection_routes(sandboxes: dict[str, Sandbox]) -> list[web.RouteDef]:
    def pick(request: web.Request) -> Sandbox:
        try:
            return sandboxes[request.match_info["provider"]]
        except KeyError:
            raise web.HTTPNotFound(text="no such sandbox") from None

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(pick(request).stats())

    async def requests(request: web.Request) -> web.Response:
        box = pick(request)
        offset = int(request.query.get("offset", 0))
        limit = int(request.query.get("limit", 1000))
        items = box.received[offset : offset + limit]
        return web.json_response(
            {
                "total": len(box.received),
                "items": [
                    {
                        "id": r.provider_message_id,
                        "received_at": r.received_at,
                        "body": r.body,
                        "receipt_status": r.receipt_status,
                    }
                    for r in items
                ],
            }
        )

    async def configure(request: web.Request) -> web.Response:
        box = pick(request)
        box.faults = Faults.model_validate({**box.faults.model_dump(), **await request.json()})
        if box.faults.seed is not None:
            box.rng.seed(box.faults.seed)
        return web.json_response(box.faults.model_dump())

    async def reset(request: web.Request) -> web.Response:
        pick(request).reset()
        return web.json_response({"ok": True})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "providers": sorted(sandboxes)})

    return [
        web.get("/_sandbox/health", health),
        web.get("/_sandbox/{provider}/stats", stats),
        web.get("/_sandbox/{provider}/requests", requests),
        web.post("/_sandbox/{provider}/faults", configure),
        web.post("/_sandbox/{provider}/reset", reset),
    ]
