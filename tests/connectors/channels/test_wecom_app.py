"""The WeCom application-message adapter against its sandbox over loopback HTTP: the case table, then
the access token's cache and refresh, the message types, and what arrived."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.wecom_app import WecomAppAdapter
from schemas.config import Channel
from tests.connectors.channels.harness import ProviderHarness, message, send_once

pytestmark = pytest.mark.integration

OPTIONS = {"agent_id": "1000002"}
WRONG = WecomAppAdapter.Credentials(corp_secret=SecretStr("wrong"))

# case: (faults, wrong credentials?, channel overrides, message overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, {}, (DeliveryStatus.failed, "40001", False)),
    "invalid user": ({}, False, {}, {"address": "nobody"}, (DeliveryStatus.failed, "81013", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, {}, (DeliveryStatus.failed, "45009", True)),
    "system busy": ({"error_rate": 1.0}, False, {}, {}, (DeliveryStatus.failed, "-1", True)),
    "outage": ({"outage": True}, False, {}, {}, (DeliveryStatus.failed, "http_503", True)),
    "malformed response": (
        {"malformed_rate": 1.0},
        False,
        {},
        {},
        (DeliveryStatus.failed, "malformed_response", False),
    ),
    "timeout": ({"latency_ms": 400}, False, {"timeout_s": 0.1}, {}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, wrong, channel, overrides, (status, code, retryable) = CASES[case]
    channel = {"options": OPTIONS, **channel}
    credentials = WRONG if wrong else None
    result, box = send_once("wecom-app", tmp_path, faults=faults, credentials=credentials, message=overrides, **channel)
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        assert result.provider_message_id == "wecom-app-0000000001"
        body = box.received[0].body
        assert body["msgtype"] == "textcard" and body["touser"] == "u1" and body["agentid"] == 1000002
        assert body["textcard"]["description"] == "你好 — only 3 left"
        assert body["textcard"]["url"] == "http://127.0.0.1/c/abc"
    if case in {"auth failure", "invalid user"}:
        assert not box.received
    if case == "auth failure":
        assert box.rejected == 1


def test_token_is_cached_and_refreshed_once_when_revoked(tmp_path) -> None:
    async def run():
        async with ProviderHarness("wecom-app", tmp_path) as h:
            adapter = h.adapter(options=OPTIONS)
            first = await adapter.send(h.message(message_id="m1"))
            second = await adapter.send(h.message(message_id="m2"))
            issued_before = h.box.tokens_issued
            h.box.tokens.clear()  # WeCom invalidated the token early
            third = await adapter.send(h.message(message_id="m3"))
            return [first, second, third], issued_before, h.box

    results, issued_before, box = asyncio.run(run())
    assert all(r.status is DeliveryStatus.accepted for r in results)
    assert issued_before == 1 and box.tokens_issued == 2
    assert box.rejected == 1 and len(box.received) == 3  # the stale-token attempt, then the retry


def test_message_types_follow_the_content(tmp_path) -> None:
    async def run():
        async with ProviderHarness("wecom-app", tmp_path) as h:
            markdown = h.adapter(options=OPTIONS, format="wecom")
            plain = h.adapter(options=OPTIONS)
            await markdown.send(h.message(link=None, body="### Flash sale\n\n你好"))
            await plain.send(h.message(link=None))
            await plain.send(h.message(image_url="http://127.0.0.1/i.png"))
            return [r.body for r in h.box.received]

    markdown, text, news = asyncio.run(run())
    assert markdown["msgtype"] == "markdown" and markdown["markdown"]["content"] == "### Flash sale\n\n你好"
    assert text["msgtype"] == "text" and text["text"]["content"] == "你好 — only 3 left"
    assert news["msgtype"] == "news" and news["news"]["articles"][0]["picurl"] == "http://127.0.0.1/i.png"


@pytest.mark.unit
def test_textcard_is_cut_to_wecom_byte_limits() -> None:
    adapter_cls = adapter_class("wecom-app")
    assert adapter_cls is WecomAppAdapter

    async def build():
        adapter = WecomAppAdapter(
            Channel(id="ch", provider="wecom-app", options=OPTIONS), WecomAppAdapter.Credentials()
        )
        try:
            return adapter.payload(message(title="标" * 100, body="字" * 1000, extra=json.dumps({"x": 1})))
        finally:
            await adapter.close()

    card = asyncio.run(build())["textcard"]
    assert len(card["title"].encode()) <= 128 and len(card["description"].encode()) <= 512
    assert card["btntxt"] == "详情"


@pytest.mark.unit
def test_agent_id_is_required_and_no_receipts() -> None:
    with pytest.raises(ValueError, match="agent_id"):
        WecomAppAdapter(Channel(id="ch", provider="wecom-app"), WecomAppAdapter.Credentials())
    with pytest.raises(ReceiptRejected) as refused:
        WecomAppAdapter.parse_receipts(WecomAppAdapter.Credentials(), ReceiptRequest("POST", "/", {}, b"{}"))
    assert refused.value.status == 404 and not WecomAppAdapter.sends_receipts
