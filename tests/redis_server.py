"""A throwaway redis-server for tests that need a Redis of their own (not the session stack's)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from tests.ports import free_port


@contextlib.contextmanager
def running_redis(password: str | None = None) -> Iterator[str]:
    """redis-server on a free loopback port (no persistence; `password` required when given): its URL
    once it answers PING, the process stopped afterwards. Skips the test where Redis is not installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--requirepass", password] if password else []
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    try:
        client, deadline = redis.Redis.from_url(url), time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)  # polling a starting process, with a deadline
        client.close()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
