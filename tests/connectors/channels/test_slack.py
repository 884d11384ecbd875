"""The Slack chat.postMessage adapter against its sandbox over loopback HTTP: the case table (errors
on HTTP 200 with ok=false), then the "channel:ts" id, the channel option and what arrived."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.slack import SlackAdapter
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

BLOCKS = [{"type": "section", "text": {"type": "mrkdwn", "text": "你好 — only 3 left"}}]
EXTRA = json.dumps({"blocks": BLOCKS})
WRONG = SlackAdapter.Credentials(token=SecretStr("xoxb-wrong"))

# case: (faults, wrong token?, channel overrides, message overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, {}, (DeliveryStatus.failed, "invalid_auth", False)),
    "channel not found": (
        {},
        False,
        {},
        {"address": "C0NOTFOUND"},
        (DeliveryStatus.failed, "channel_not_found", False),
    ),
    "not in channel": ({}, False, {}, {"address": "C0NOTMEMBER"}, (DeliveryStatus.failed, "not_in_channel", False)),
    # Slack truncates text past 40,000 chars; the adapter cuts it first rather than meet msg_too_long.
    "long text": ({}, False, {}, {"body": "x" * 40_001, "extra": None}, (DeliveryStatus.accepted, None, False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, {}, (DeliveryStatus.failed, "ratelimited", True)),
    "outage": ({"outage": True}, False, {}, {}, (DeliveryStatus.failed, "service_unavailable", True)),
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
    message = {"address": "C0LOOPCAST", "body": "你好 — only 3 left", "extra": EXTRA, **overrides}
    channel = {"format": "slack", **channel}
    result, box = send_once(
        "slack", tmp_path, faults=faults, credentials=WRONG if wrong else None, message=message, **channel
    )
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        body = box.received[0].body
        assert body == {"channel": "C0LOOPCAST", "text": "你好 — only 3 left", "unfurl_links": False, "blocks": BLOCKS}
        channel_id, ts = result.provider_message_id.split(":")
        assert channel_id == "C0LOOPCAST" and ts.endswith(".000001")
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


def test_channel_option_overrides_the_address_and_ids_differ(tmp_path) -> None:
    async def run():
        async with ProviderHarness("slack", tmp_path) as h:
            adapter = h.adapter(options={"channel": "C0ANNOUNCE"})
            first = await adapter.send(h.message(message_id="m1"))
            second = await adapter.send(h.message(message_id="m2"))
            return first, second, h.box

    first, second, box = asyncio.run(run())
    assert (
        first.provider_message_id.startswith("C0ANNOUNCE:") and first.provider_message_id != second.provider_message_id
    )
    assert box.received[0].body["text"] == "Flash sale\n\n你好 — only 3 left"
    assert all(r.body["channel"] == "C0ANNOUNCE" for r in box.received)


@pytest.mark.unit
def test_declares_limits_and_no_receipts() -> None:
    assert adapter_class("slack") is SlackAdapter
    assert SlackAdapter.limits.rate_per_s == 1 and SlackAdapter.returns_provider_ids
    with pytest.raises(ReceiptRejected) as refused:
        SlackAdapter.parse_receipts(SlackAdapter.Credentials(), ReceiptRequest("POST", "/", {}, b"{}"))
    assert refused.value.status == 404
