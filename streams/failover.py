"""Which provider gets a message, and when a failed one is tried again: weighted provider routes,
a circuit breaker per route, and exponential backoff with jitter. Pure: the dispatch stage keeps
one `Routes` per worker and feeds it results.

A route that keeps failing is skipped until it recovers (open for `open_s`, then one probe), so
an outage moves traffic to the backup in well under a second at any real send rate; a message
that failed on one route is retried on another at once when one is healthy, else later.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass, field

MAX_ATTEMPTS = 5
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0


def backoff_s(attempt: int, retry_after_s: float | None = None, rng: random.Random | None = None) -> float:
    """Delay before attempt `attempt + 1`: exponential with jitter (0.5–1×), never below the provider's
    Retry-After. Jitter spreads a burst of failures so the retries do not arrive as a burst."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
    delay = ceiling * (0.5 + 0.5 * (rng or random).random())
    return max(delay, retry_after_s or 0.0)


@dataclass
class Breaker:
    """Closed → open after `consecutive` failures in a row, or when `failure_ratio` of the last
    `window` calls (at least `min_calls`) failed; open → half-open after `open_s` (one probe);
    the probe's result closes or re-opens it. Windows count calls, not seconds, so a busy
    provider's good past does not hide its outage for long."""

    window: int = 20
    min_calls: int = 10
    failure_ratio: float = 0.5
    consecutive: int = 5
    open_s: float = 2.0
    calls: deque[bool] = field(default_factory=deque)
    failures_in_a_row: int = 0
    opened_at: float | None = None
    # Half-open: when the one probe was let through (a probe that never reports expires after open_s).
    probe_at: float | None = None

    def available(self, now: float) -> bool:
        if self.opened_at is None:
            return True
        if now - self.opened_at < self.open_s:
            return False
        return self.probe_at is None or now - self.probe_at >= self.open_s

    def chosen(self, now: float) -> None:
        if self.opened_at is not None:
            self.probe_at = now

    def record(self, ok: bool, now: float) -> None:
        if self.opened_at is not None:
            if self.probe_at is not None:
                self.probe_at = None
                self.opened_at = None if ok else now
                self.calls.clear()
                self.failures_in_a_row = 0
            return
        self.calls.append(ok)
        if len(self.calls) > self.window:
            self.calls.popleft()
        self.failures_in_a_row = 0 if ok else self.failures_in_a_row + 1
        failures = self.calls.count(False)
        ratio_tripped = len(self.calls) >= self.min_calls and failures >= self.failure_ratio * len(self.calls)
        if self.failures_in_a_row >= self.consecutive or ratio_tripped:
            self.opened_at = now
            self.failures_in_a_row = 0

    @property
    def state(self) -> str:
        return "closed" if self.opened_at is None else "half-open" if self.probe_at is not None else "open"


class Routes:
    """Breakers by route key ("<channel>/<index>:<provider>"), and the choice of route per message."""

    def __init__(self, **breaker: float) -> None:
        self.breaker_settings = breaker
        self.breakers: dict[str, Breaker] = {}

    def breaker(self, key: str) -> Breaker:
        found = self.breakers.get(key)
        if found is None:
            found = self.breakers[key] = Breaker(**self.breaker_settings)
        return found

    def choose(
        self, keys: list[str], weights: list[float], message_id: str, skip: set[str] | frozenset[str], now: float
    ) -> int | None:
        """The route for this message: weighted, stable per message (its retries and a redelivery
        land on the same choice), among healthy routes it has not failed on. None: no route now."""
        usable = [i for i, key in enumerate(keys) if key not in skip and self.breaker(key).available(now)]
        # Weight 0 is a standby: it takes traffic only while no weighted route can.
        candidates = [i for i in usable if weights[i] > 0] or usable[:1]
        if not candidates:
            return None
        if weights[candidates[0]] == 0:
            self.breaker(keys[candidates[0]]).chosen(now)
            return candidates[0]
        total = sum(weights[i] for i in candidates)
        point = int.from_bytes(hashlib.blake2b(message_id.encode(), digest_size=8).digest()) / 2**64 * total
        chosen = candidates[-1]
        for i in candidates:
            point -= weights[i]
            if point < 0:
                chosen = i
                break
        self.breaker(keys[chosen]).chosen(now)
        return chosen

    def record(self, key: str, ok: bool, now: float) -> None:
        self.breaker(key).record(ok, now)

    def states(self) -> dict[str, str]:
        return {key: b.state for key, b in self.breakers.items()}
