"""The Slack incoming-webhook adapter against its sandbox over loopback HTTP: the case table (Slack's
plain-text answers), then the blocks from the copy engine and what arrived."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.slack_webhook import SlackWebhookAdapter
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

BLOCKS = [
    {"type": "header", "text": {"type": "plain_text", "text": "Flash sale", "emoji": True}},
    {"type": "section", "text": {"type": "mrkdwn", "text": "你好 — only 3 left"}},
]
WRONG = SlackWebhookAdapter.Credentials(path=SecretStr("T00000000/B00000000/wrong"))

# case: (faults, wrong path?, channel overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, (DeliveryStatus.failed, "no_service", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, (DeliveryStatus.failed, "rate_limited", True)),
    "outage": ({"outage": True}, False, {}, (DeliveryStatus.failed, "service_unavailable", True)),
    "malformed response": ({"malformed_rate": 1.0}, False, {}, (DeliveryStatus.failed, "malformed_response", False)),
    "timeout": ({"latency_ms": 400}, False, {"timeout_s": 0.1}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, wrong, channel, (status, code, retryable) = CASES[case]
    message = {"body": "*Flash sale*\n\n你好 — only 3 left", "extra": json.dumps({"blocks": BLOCKS})}
    channel = {"format": "slack", **channel}
    credentials = WRONG if wrong else None
    result, box = send_once(
        "slack-webhook", tmp_path, faults=faults, credentials=credentials, message=message, **channel
    )
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    assert result.provider_message_id is None
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        assert box.received[0].body == {"text": "*Flash sale*\n\n你好 — only 3 left", "blocks": BLOCKS}
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


def test_without_blocks_the_text_carries_the_title(tmp_path) -> None:
    async def run():
        async with ProviderHarness("slack-webhook", tmp_path) as h:
            return await h.adapter().send(h.message()), h.box

    result, box = asyncio.run(run())
    assert result.status is DeliveryStatus.accepted
    assert box.received[0].body == {"text": "Flash sale\n\n你好 — only 3 left"}


@pytest.mark.unit
def test_declares_limits_and_no_receipts() -> None:
    assert adapter_class("slack-webhook") is SlackWebhookAdapter
    assert SlackWebhookAdapter.limits.rate_per_s == 1 and SlackWebhookAdapter.limits.body_maxlen == 40_000
    with pytest.raises(ReceiptRejected) as refused:
        SlackWebhookAdapter.parse_receipts(SlackWebhookAdapter.Credentials(), ReceiptRequest("POST", "/", {}, b"{}"))
    assert refused.value.status == 404
