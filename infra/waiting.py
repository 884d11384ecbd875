"""Wait on a condition with a deadline: the one way Loopcast code and tests wait for anything.

A bare sleep is a guess; these poll a predicate and fail loudly, naming what was awaited, when the
deadline passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _message(what: str, timeout_s: float, last_error: BaseException | None) -> str:
    msg = f"timed out after {timeout_s:g}s waiting for {what}"
    if last_error is not None:
        msg += f" (last error: {type(last_error).__name__}: {last_error})"
    return msg


def wait_for(
    predicate: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.1,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns something truthy and return that value.

    Raises TimeoutError naming `what` once `timeout_s` has passed. Exceptions of the types in `ignore`
    count as "not yet" (the last one is quoted in the TimeoutError); any other exception propagates.
    The predicate is always tried at least once, and once more at the deadline.
    """
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(_message(what, timeout_s, last_error))
        time.sleep(min(interval_s, remaining))


async def wait_for_async(
    predicate: Callable[[], Awaitable[T] | T],
    timeout_s: float,
    interval_s: float = 0.1,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Like `wait_for`, for use inside an event loop; the predicate may be sync or async."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result  # type: ignore[return-value]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(_message(what, timeout_s, last_error))
        await asyncio.sleep(min(interval_s, remaining))
