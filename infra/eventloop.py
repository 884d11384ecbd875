"""The event loop every Loopcast process runs on."""

from __future__ import annotations

import asyncio


def use_fast_loop() -> None:
    """uvloop where it installs: a worker spends much of its time in the event loop itself
    (`loopcast bench dispatch`)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
