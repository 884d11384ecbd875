"""The Feishu custom-bot adapter against its sandbox over loopback HTTP: the case table, then the
signature both ways, the card from the copy engine and what arrived."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.feishu import FeishuAdapter, sign, throttled, verify
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

CARD = {
    "config": {"wide_screen_mode": True},
    "header": {"title": {"tag": "plain_text", "content": "Flash sale"}, "template": "blue"},
    "elements": [{"tag": "div", "text": {"tag": "plain_text", "content": "你好 — only 3 left"}}],
}
EXTRA = json.dumps({"card": CARD, "body_text": "你好 — only 3 left"}, ensure_ascii=False)
WRONG_SECRET = FeishuAdapter.Credentials(secret=SecretStr("wrong"))
WRONG_HOOK = FeishuAdapter.Credentials(hook_id=SecretStr("no-such-hook"))

# case: (faults, credentials, channel overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, None, {}, (DeliveryStatus.accepted, None, False)),
    "bad signature": ({}, WRONG_SECRET, {}, (DeliveryStatus.failed, "19021", False)),
    "unknown hook": ({}, WRONG_HOOK, {}, (DeliveryStatus.failed, "19001", False)),
    "throttled": ({"throttle_rate": 1.0}, None, {}, (DeliveryStatus.failed, "11232", True)),
    "server error": ({"error_rate": 1.0}, None, {}, (DeliveryStatus.failed, "9499", True)),
    "outage": ({"outage": True}, None, {}, (DeliveryStatus.failed, "http_503", True)),
    "malformed response": ({"malformed_rate": 1.0}, None, {}, (DeliveryStatus.failed, "malformed_response", False)),
    "timeout": ({"latency_ms": 400}, None, {"timeout_s": 0.1}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, credentials, channel, (status, code, retryable) = CASES[case]
    message = {"extra": EXTRA}
    result, box = send_once(
        "feishu", tmp_path, faults=faults, credentials=credentials, message=message, format="feishu", **channel
    )
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        body = box.received[0].body
        assert body["msg_type"] == "interactive" and body["card"] == CARD
        assert verify(FeishuAdapter.Credentials().secret.get_secret_value(), body["timestamp"], body["sign"])
    if credentials is not None:
        assert box.rejected == 1 and not box.received


def test_text_fallback_and_stale_timestamp(tmp_path) -> None:
    async def run():
        async with ProviderHarness("feishu", tmp_path) as h:
            adapter = h.adapter()
            sent = await adapter.send(h.message())
            stale = adapter.payload(h.message(), now=int(time.time()) - 7200)
            url = f"{h.base_url}/open-apis/bot/v2/hook/{h.credentials.hook_id.get_secret_value()}"
            async with adapter.session.post(url, json=stale) as response:
                refused = await response.json()
            return sent, refused, h.box

    sent, refused, box = asyncio.run(run())
    assert sent.status is DeliveryStatus.accepted
    assert box.received[0].body["content"] == {"text": "Flash sale\n\n你好 — only 3 left\n\nhttp://127.0.0.1/c/abc"}
    assert refused["code"] == 19021 and box.rejected == 1


@pytest.mark.unit
def test_signature_matches_feishu_recipe() -> None:
    secret, stamp = "s3cret", 1_700_000_000
    # Feishu keys the HMAC with "timestamp\nsecret" and signs an empty message.
    expected = base64.b64encode(hmac.new(f"{stamp}\n{secret}".encode(), b"", hashlib.sha256).digest()).decode()
    assert sign(secret, stamp) == expected
    assert verify(secret, str(stamp), expected, now=stamp + 10)
    assert not verify("other", str(stamp), expected, now=stamp)
    assert not verify(secret, str(stamp), expected, now=stamp + 3601)


@pytest.mark.unit
def test_throttling_codes_and_no_receipts() -> None:
    assert adapter_class("feishu") is FeishuAdapter
    assert throttled(11232, "frequency limited") and throttled(9499, "too many request")
    assert not throttled(9499, "Bad Request") and not throttled(19021, "sign match fail")
    with pytest.raises(ReceiptRejected) as refused:
        FeishuAdapter.parse_receipts(FeishuAdapter.Credentials(), ReceiptRequest("POST", "/", {}, b"{}"))
    assert refused.value.status == 404
