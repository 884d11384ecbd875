"""Priority routing for dispatch: provider send slots go to urgent messages first.

All dispatch tiers share one pool of in-flight sends per worker. A freed slot goes to the highest
tier with a waiter, except that a lower tier gets a guaranteed share of recent grants so it never
starves. A tier waiting for slots stops taking batches, so its consumer stops fetching its partitions
(backpressure): lower tiers are in effect paused while higher tiers have backlog.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

TIERS = ("high", "normal", "low")
# Minimum share of recent grants a waiting tier gets, so a marketing backlog still moves.
DEFAULT_SHARES = {"normal": 0.10, "low": 0.05}
WINDOW = 200  # grants remembered for the share
# After an urgent message is seen anywhere in the loop, lower tiers' partitions pause this long: the
# consumers stop fetching them, and the worker's CPU goes to the urgent path.
URGENT_HOLD_S = 2.0
# A pause lasts at most this long, then lower tiers run for RESUME_S: their guaranteed share.
MAX_PAUSE_S = 5.0
RESUME_S = 0.5


class PriorityGate:
    def __init__(
        self,
        slots: int,
        *,
        shares: dict[str, float] | None = None,
        enabled: bool = True,
        hold_s: float = URGENT_HOLD_S,
        max_pause_s: float = MAX_PAUSE_S,
        resume_s: float = RESUME_S,
    ) -> None:
        self.hold_s, self.max_pause_s, self.resume_s = hold_s, max_pause_s, resume_s
        self.free = slots
        self.shares = DEFAULT_SHARES if shares is None else shares
        self.enabled = enabled
        self.waiters: dict[str, deque[asyncio.Future]] = {tier: deque() for tier in TIERS}
        # Without priority routing: one queue in arrival order (for comparison in `bench policy`).
        self.fifo: deque[tuple[str, asyncio.Future]] = deque()
        self.recent: deque[str] = deque(maxlen=WINDOW)
        self.urgent_until = 0.0
        self.paused_since: float | None = None
        self._pause: Callable[[], None] = lambda: None
        self._resume: Callable[[], None] = lambda: None
        self._watch: asyncio.Task | None = None

    def bind(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        """How to pause and resume the lower tiers' partitions (the worker's Kafka consumer)."""
        self._pause, self._resume = pause, resume

    def note_urgent(self) -> None:
        """A stage handled a high-priority message: pause the lower tiers for a moment."""
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        self.urgent_until = loop.time() + self.hold_s
        if self.paused_since is None and (self._watch is None or self._watch.done()):
            self.paused_since = loop.time()
            self._pause()
            self._watch = loop.create_task(self._resume_when_calm())

    async def _resume_when_calm(self) -> None:
        loop = asyncio.get_running_loop()
        while self.paused_since is not None:
            now = loop.time()
            if now >= self.urgent_until or now - self.paused_since >= self.max_pause_s:
                self.paused_since = None
                self._resume()
                if now < self.urgent_until:
                    # Still urgent traffic: the lower tiers' share, then pause again.
                    await asyncio.sleep(self.resume_s)  # a duty cycle, not synchronisation
                    if loop.time() < self.urgent_until:
                        self.paused_since = loop.time()
                        self._pause()
                continue
            await asyncio.sleep(min(0.05, self.urgent_until - now))  # re-checked: urgency may be extended

    async def acquire(self, tier: str) -> None:
        if self.free > 0 and not self._anyone_waiting():
            self.free -= 1
            self.recent.append(tier)
            return
        future = asyncio.get_running_loop().create_future()
        if self.enabled:
            self.waiters[tier].append(future)
        else:
            self.fifo.append((tier, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted while being cancelled: hand the slot on
            raise

    def release(self) -> None:
        self.free += 1
        while self.free > 0 and (chosen := self._next()) is not None:
            tier, future = chosen
            if future.cancelled():
                continue
            self.free -= 1
            self.recent.append(tier)
            future.set_result(None)

    def _anyone_waiting(self) -> bool:
        return bool(self.fifo) or any(self.waiters.values())

    def _next(self) -> tuple[str, asyncio.Future] | None:
        if not self.enabled:
            return self.fifo.popleft() if self.fifo else None
        # A starving lower tier first (lowest first), then strictly by priority.
        for tier in reversed(TIERS):
            share = self.shares.get(tier, 0.0)
            # Judged only over enough grants for the share to mean something (10 for 10%).
            enough = share and len(self.recent) >= 1 / share
            if self.waiters[tier] and enough and self.recent.count(tier) < share * len(self.recent):
                return tier, self.waiters[tier].popleft()
        for tier in TIERS:
            if self.waiters[tier]:
                return tier, self.waiters[tier].popleft()
        return None

    def slot(self, tier: str) -> _Slot:
        """`async with gate.slot(tier):` holds one send slot."""
        return _Slot(self, tier)


class _Slot:
    def __init__(self, gate: PriorityGate, tier: str) -> None:
        self.gate, self.tier = gate, tier

    async def __aenter__(self) -> None:
        await self.gate.acquire(self.tier)

    async def __aexit__(self, *exc: object) -> None:
        self.gate.release()
