"""The WeCom group-robot adapter against its sandbox over loopback HTTP: the case table, then the
markdown/text bodies that arrived and the declared robot rate."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.wecom_bot import WecomBotAdapter
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

WRONG = WecomBotAdapter.Credentials(key=SecretStr("wrong-key"))

# case: (faults, wrong key?, channel overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, (DeliveryStatus.failed, "93000", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, (DeliveryStatus.failed, "45009", True)),
    "outage": ({"outage": True}, False, {}, (DeliveryStatus.failed, "http_503", True)),
    "malformed response": ({"malformed_rate": 1.0}, False, {}, (DeliveryStatus.failed, "malformed_response", False)),
    "timeout": ({"latency_ms": 400}, False, {"timeout_s": 0.1}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, wrong, channel, (status, code, retryable) = CASES[case]
    message = {"body": "### Flash sale\n\n你好 — only 3 left"}
    channel = {"format": "wecom", **channel}
    credentials = WRONG if wrong else None
    result, box = send_once("wecom-bot", tmp_path, faults=faults, credentials=credentials, message=message, **channel)
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    assert result.provider_message_id is None
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        assert box.received[0].body == {
            "msgtype": "markdown",
            "markdown": {"content": "### Flash sale\n\n你好 — only 3 left"},
        }
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


def test_plain_formats_go_as_text_and_long_markdown_is_cut_to_4096_bytes(tmp_path) -> None:
    async def run():
        async with ProviderHarness("wecom-bot", tmp_path) as h:
            text = await h.adapter(format="webhook").send(h.message())
            long = await h.adapter(format="wecom").send(h.message(body="字" * 3000))
            return text, long, [r.body for r in h.box.received]

    text, long, (plain, markdown) = asyncio.run(run())
    assert text.status is DeliveryStatus.accepted and long.status is DeliveryStatus.accepted
    assert plain == {
        "msgtype": "text",
        "text": {"content": "Flash sale\n\n你好 — only 3 left\n\nhttp://127.0.0.1/c/abc"},
    }
    assert len(markdown["markdown"]["content"].encode()) <= 4096


@pytest.mark.unit
def test_declares_the_robot_rate_and_no_receipts() -> None:
    assert adapter_class("wecom-bot") is WecomBotAdapter
    assert WecomBotAdapter.limits.rate_per_s == pytest.approx(20 / 60)
    assert not WecomBotAdapter.returns_provider_ids and not WecomBotAdapter.sends_receipts
    with pytest.raises(ReceiptRejected) as refused:
        WecomBotAdapter.parse_receipts(WecomBotAdapter.Credentials(), ReceiptRequest("POST", "/", {}, b"{}"))
    assert refused.value.status == 404
