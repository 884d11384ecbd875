"""The inbox adapter and its store against a real redis-server started for this module (password
required, no persistence), plus stand-in servers for a silent and a garbling Redis."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import pytest
import redis
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, adapter_class
from connectors.channels.inbox import InboxAdapter
from connectors.inbox_store import InboxStore
from schemas.config import Channel
from tests.connectors.channels.harness import ProviderHarness, message
from tests.ports import free_port
from tests.redis_server import running_redis

pytestmark = pytest.mark.integration

PASSWORD = "loopcast-inbox-test"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    with running_redis(PASSWORD) as url:
        yield url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    return redis_server


async def silent_or_garbling_server(garble: bool) -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1024):
            if garble:
                writer.write(b"<html>502</html>\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


# case: (how to reach Redis) → (status, error code, retryable)
CASES = {
    "success": ("ok", (DeliveryStatus.accepted, None, False)),
    "auth failure": ("wrong password", (DeliveryStatus.failed, "redis_auth", False)),
    "outage": ("nothing listening", (DeliveryStatus.failed, "transport", True)),
    "malformed response": ("garbling", (DeliveryStatus.failed, "redis_error", True)),
    "timeout": ("silent", (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, redis_url: str, tmp_path) -> None:
    how, (status, code, retryable) = CASES[case]

    async def run():
        server = None
        url = redis_url
        if how == "wrong password":
            url = redis_url.replace(PASSWORD, "wrong")
        elif how == "nothing listening":
            url = f"redis://127.0.0.1:{free_port()}/0"
        elif how in ("garbling", "silent"):
            server, port = await silent_or_garbling_server(garble=how == "garbling")
            url = f"redis://127.0.0.1:{port}/0"
        try:
            async with ProviderHarness("inbox", tmp_path) as h:
                adapter = h.adapter(url=None, format="inbox", timeout_s=0.3, options={"redis_url": url})
                result = await adapter.send(h.message(user_id="u1", title="Hi", body="你好", link="http://x/c/1"))
                store = InboxStore(redis_url)
                items = await store.list("u1")
                await store.close()
                return result, items
        finally:
            if server is not None:
                server.close()

    result, items = asyncio.run(run())
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "success":
        assert result.provider_message_id == "m1"
        [item] = items
        assert (item.message_id, item.title, item.body, item.link, item.read) == (
            "m1",
            "Hi",
            "你好",
            "http://x/c/1",
            False,
        )


def test_credentials_default_to_the_stacks_redis(redis_url: str, tmp_path) -> None:
    async def run():
        async with ProviderHarness("inbox", tmp_path, redis_url=redis_url) as h:
            assert h.credentials.redis_url.get_secret_value() == redis_url
            first = await h.adapter(url=None, format="inbox").send(h.message())
            again = await h.adapter(url=None, format="inbox").send(h.message())  # a redelivery
            store = InboxStore(redis_url)
            try:
                return first, again, await store.list("u1"), await store.unread_count("u1")
            finally:
                await store.close()

    first, again, items, unread = asyncio.run(run())
    assert first.status == again.status == DeliveryStatus.accepted and again.raw == "already stored"
    assert len(items) == 1 and unread == 1


def test_store_lists_newest_first_pages_caps_and_marks_read(redis_url: str) -> None:
    async def run():
        store = InboxStore(redis_url, cap=5)
        try:
            for n in range(7):
                await store.add("u1", f"m{n}", body=f"body {n}", created_at=1_000 + n)
            await store.add("u2", "other", body="not yours", created_at=5_000)
            page1 = await store.list("u1", limit=3)
            page2 = await store.list("u1", limit=3, before=page1[-1].message_id)
            gone = await store.list("u1", before="m0")
            unread = await store.unread_count("u1")
            marked = await store.mark_read("u1", ["m6", "m5", "m0", "other"])
            twice = await store.mark_read("u1", ["m6"])
            await store.add("u1", "m6", body="redelivered", created_at=9_999)  # must stay read
            after = await store.list("u1", limit=2)
            all_marked = await store.mark_read("u1")
            return (
                page1,
                page2,
                gone,
                unread,
                marked,
                twice,
                after,
                all_marked,
                [await store.unread_count(u) for u in ("u1", "u2")],
            )
        finally:
            await store.close()

    page1, page2, gone, unread, marked, twice, after, all_marked, unread_after = asyncio.run(run())
    assert [i.message_id for i in page1] == ["m6", "m5", "m4"] and [i.message_id for i in page2] == ["m3", "m2"]
    assert gone == [] and unread == 5  # the cap of 5 dropped m0 and m1, read state included
    assert (marked, twice, all_marked) == (2, 0, 3)  # m0 was trimmed, "other" belongs to u2
    assert [(i.message_id, i.read, i.body) for i in after] == [("m6", True, "body 6"), ("m5", True, "body 5")]
    assert unread_after == [0, 1]


@pytest.mark.unit
def test_registry_and_configuration() -> None:
    assert adapter_class("inbox") is InboxAdapter
    with pytest.raises(ValueError, match="redis_url"):
        InboxAdapter(Channel(id="i", provider="inbox", format="inbox"), InboxAdapter.Credentials())
    with pytest.raises(ValueError, match="cap"):
        InboxAdapter(
            Channel(id="i", provider="inbox", format="inbox", options={"cap": "many"}),
            InboxAdapter.Credentials(redis_url=SecretStr("redis://127.0.0.1:1/0")),
        )
    assert message().user_id == "u1"
