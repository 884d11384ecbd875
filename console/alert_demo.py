"""A delivery-rate alert shown on the running stack: steady traffic through a webhook channel, then
its provider failing (the sandbox reports most messages undelivered) until the monitor's alert
arrives; the e2e test and the demo drive the same scenario.

    from console.alert_demo import show_delivery_alert
    alert = show_delivery_alert(Settings())  # ~1 min with the default windows; prints nothing
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
from aiokafka import AIOKafkaProducer

from connectors.kafka import produce, read_to_end
from connectors.state import State
from infra import topics
from infra.settings import Settings
from infra.waiting import wait_for
from schemas.config import Campaign, Channel, Template, Trigger
from schemas.contracts import codec, encode
from schemas.models import Alert, Event
from streams.monitor import DROP
from streams.policy import Category


def operator_channel(settings: Settings) -> Channel:
    """The operators' channel the monitor reports to (settings.alert_channel): the WeCom bot sandbox."""
    return Channel(
        id=settings.alert_channel, provider="wecom-bot", url=f"{settings.sandbox_base}/wecom-bot", format="wecom"
    )


class ProviderFailure:
    """One webhook channel with a transactional campaign (no caps hold the traffic back), events at a
    steady rate from a background thread, and the provider's sandbox turned bad and good again."""

    def __init__(self, settings: Settings, prefix: str = "alert-demo", rate_per_s: float = 10.0, users: int = 200):
        self.settings = settings
        self.prefix = prefix
        self.rate_per_s = rate_per_s
        self.users = [f"{prefix}-user-{i:04d}" for i in range(users)]
        self.channel = Channel(id=f"{prefix}-ch", provider="webhook", url=f"{settings.sandbox_base}/webhook/{prefix}")
        self.subject = f"{self.channel.id}/webhook"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = 0
        self.failed_at: float | None = None  # time.monotonic() when the provider was made to fail

    def setup(self, with_operator_channel: bool = True) -> None:
        """Profiles and config; `with_operator_channel` points settings.alert_channel at the WeCom bot
        sandbox (leave it False on a stack whose operators' channel is real)."""
        documents = [
            *([operator_channel(self.settings)] if with_operator_channel else []),
            self.channel,
            Template(id=f"{self.prefix}-t", body="Your order {order} has shipped"),
            Campaign(
                id=self.prefix,
                name=self.prefix,
                trigger=Trigger(event_type=f"{self.prefix}_go"),
                channel=self.channel.id,
                template_id=f"{self.prefix}-t",
                category=Category.transactional,
                field_defaults={"order": "#1"},
            ),
        ]

        async def go() -> None:
            state = State(self.settings.redis)
            await state.put_profiles([{"user_id": u} for u in self.users])
            await state.close()
            await produce(self.settings.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in documents])

        asyncio.run(go())

    # --- traffic ------------------------------------------------------------------------------

    def start_traffic(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._traffic()), daemon=True)
        self._thread.start()

    def stop_traffic(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def _traffic(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.bootstrap, linger_ms=5)
        await producer.start()
        tick_s = 0.2
        per_tick = self.rate_per_s * tick_s
        owed = 0.0
        try:
            while not self._stop.is_set():
                owed += per_tick
                for _ in range(int(owed)):
                    user = self.users[self.fired % len(self.users)]
                    event = Event(
                        event_id=f"{self.prefix}-{self.fired}",
                        event_type=f"{self.prefix}_go",
                        user_id=user,
                        occurred_at=datetime.now(UTC),
                    )
                    await producer.send(topics.EVENTS.name, encode(event), key=user.encode())
                    self.fired += 1
                owed -= int(owed)
                await asyncio.sleep(tick_s)  # pacing the load, not waiting for anything
        finally:
            await producer.stop()

    # --- the provider -------------------------------------------------------------------------

    def faults(self, **values) -> None:
        url = f"{self.settings.sandbox_base}/_sandbox/webhook/faults"
        httpx.post(url, json=values, timeout=10).raise_for_status()

    def fail(self, undelivered_rate: float = 0.8) -> None:
        self.faults(undelivered_rate=undelivered_rate)
        self.failed_at = time.monotonic()

    def heal(self) -> None:
        self.faults(undelivered_rate=0.0)

    def delivered_to_provider(self) -> int:
        url = f"{self.settings.sandbox_base}/_sandbox/webhook/requests"
        items = httpx.get(url, params={"limit": 1_000_000}, timeout=30).json()["items"]
        return sum(1 for i in items if i["body"].get("campaign_id") == self.prefix)

    def baseline_sends(self) -> int:
        """Sends the monitor needs before a drop can be judged: a baseline older than its current window."""
        cfg = self.settings.monitor
        return cfg.min_baseline_samples + math.ceil(self.rate_per_s * (cfg.window_s + 2 * cfg.bucket_s))

    def wait_for_baseline(self, timeout_s: float = 180, on_poll: Callable[[int, int], None] | None = None) -> None:
        """Until the monitor has a baseline; `on_poll(sends, needed)` after each look (progress)."""
        needed = self.baseline_sends()

        def enough() -> bool:
            sends = self.delivered_to_provider()
            if on_poll is not None:
                on_poll(sends, needed)
            return sends >= needed

        wait_for(enough, timeout_s=timeout_s, interval_s=0.5, what=f"{needed} sends")

    # --- what the monitor said ----------------------------------------------------------------

    def alerts(self, kind: str | None = None) -> list[Alert]:
        decode = codec(Alert).decode
        records = asyncio.run(read_to_end(self.settings.bootstrap, topics.ALERTS.name))
        found = [decode(r.value) for r in records]
        return [a for a in found if a.subject == self.subject and (kind is None or a.kind == kind)]

    def wait_for_alert(
        self, kind: str = DROP, timeout_s: float = 60, known: int = 0, on_poll: Callable[[], None] | None = None
    ) -> Alert:
        """The first alert of `kind` for this channel after the `known` ones already seen."""

        def found() -> list[Alert]:
            if on_poll is not None:
                on_poll()
            return self.alerts(kind)[known:]

        return wait_for(found, timeout_s=timeout_s, interval_s=0.5, what=f"a {kind} alert")[0]

    def operator_texts(self) -> list[str]:
        """What the operators' WeCom bot sandbox received about this channel (operator_channel)."""
        url = f"{self.settings.sandbox_base}/_sandbox/wecom-bot/requests"
        items = httpx.get(url, params={"limit": 10000}, timeout=30).json()["items"]
        texts = [i["body"].get("markdown", i["body"].get("text", {})).get("content", "") for i in items]
        return [t for t in texts if self.subject in t]


def show_delivery_alert(
    settings: Settings,
    prefix: str = "alert-demo",
    timeout_s: float = 120,
    with_operator_channel: bool = True,
    *,
    scenario: ProviderFailure | None = None,
    on_baseline: Callable[[int, int], None] | None = None,
    on_failing: Callable[[], None] | None = None,
) -> Alert:
    """Fail a provider under steady traffic and return the monitor's drop alert (it is also in
    ClickHouse `alerts` and at the operators' channel); the provider is healthy again afterwards.
    Needs a running worker with the monitor stage (any `stack up --workers`). `scenario` (else one
    for `prefix`) tells when it failed; `on_baseline(sends, needed)` and `on_failing()` are called
    while waiting, for progress."""
    scenario = scenario or ProviderFailure(settings, prefix)
    scenario.setup(with_operator_channel)
    known = len(scenario.alerts(DROP))
    scenario.start_traffic()
    try:
        scenario.wait_for_baseline(timeout_s=timeout_s, on_poll=on_baseline)
        scenario.fail()
        return scenario.wait_for_alert(DROP, timeout_s=timeout_s, known=known, on_poll=on_failing)
    finally:
        scenario.heal()
        scenario.stop_traffic()
