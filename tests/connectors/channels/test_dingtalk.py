"""The DingTalk custom-robot adapter against its sandbox over loopback HTTP: the case table, then the
signature both ways (a bad or stale one is refused by the sandbox) and the message bodies that arrived."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.dingtalk import DingtalkAdapter, sign, verify
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

WRONG_SECRET = DingtalkAdapter.Credentials(secret=SecretStr("SECwrong"))
WRONG_TOKEN = DingtalkAdapter.Credentials(access_token=SecretStr("wrong"))

# case: (faults, credentials, channel overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, None, {}, (DeliveryStatus.accepted, None, False)),
    "bad signature": ({}, WRONG_SECRET, {}, (DeliveryStatus.failed, "310000", False)),
    "unknown token": ({}, WRONG_TOKEN, {}, (DeliveryStatus.failed, "300001", False)),
    "throttled": ({"throttle_rate": 1.0}, None, {}, (DeliveryStatus.failed, "130101", True)),
    "outage": ({"outage": True}, None, {}, (DeliveryStatus.failed, "http_503", True)),
    "malformed response": ({"malformed_rate": 1.0}, None, {}, (DeliveryStatus.failed, "malformed_response", False)),
    "timeout": ({"latency_ms": 400}, None, {"timeout_s": 0.1}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, credentials, channel, (status, code, retryable) = CASES[case]
    message = {"body": "### Flash sale\n\n你好 — only 3 left"}
    result, box = send_once(
        "dingtalk", tmp_path, faults=faults, credentials=credentials, message=message, format="dingtalk", **channel
    )
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        body = box.received[0].body
        assert body["msgtype"] == "actionCard"
        assert body["actionCard"]["title"] == "Flash sale" and "你好 — only 3 left" in body["actionCard"]["text"]
        assert body["actionCard"]["singleURL"] == "http://127.0.0.1/c/abc"
    if credentials is not None:
        assert box.rejected == 1 and not box.received


def test_stale_timestamp_is_refused_and_markdown_without_link(tmp_path) -> None:
    async def run():
        async with ProviderHarness("dingtalk", tmp_path) as h:
            adapter = h.adapter(format="dingtalk")
            stale_url = adapter.signed_url(now_ms=int(time.time() * 1000) - 2 * 3600 * 1000)
            async with adapter.session.post(stale_url, json={"msgtype": "text", "text": {"content": "x"}}) as r:
                stale = await r.json()
            sent = await adapter.send(h.message(link=None, title=None, body="你好\n\nmore"))
            return stale, sent, h.box

    stale, sent, box = asyncio.run(run())
    assert stale["errcode"] == 310000 and box.rejected == 1
    assert sent.status is DeliveryStatus.accepted
    assert box.received[0].body == {"msgtype": "markdown", "markdown": {"title": "你好", "text": "你好\n\nmore"}}


@pytest.mark.unit
def test_signature_matches_dingtalk_recipe() -> None:
    secret, stamp = "SECabc+/=", 1_700_000_000_000
    expected = base64.b64encode(hmac.new(secret.encode(), f"{stamp}\n{secret}".encode(), hashlib.sha256).digest())
    assert sign(secret, stamp) == expected.decode()
    assert verify(secret, str(stamp), sign(secret, stamp), now_ms=stamp + 1000)
    assert not verify(secret, str(stamp), sign("other", stamp), now_ms=stamp)
    assert not verify(secret, str(stamp), sign(secret, stamp), now_ms=stamp + 3601 * 1000)
    # A base64 '+' must travel as %2B (a bare '+' in a query string is a space).
    dev = DingtalkAdapter.Credentials().secret.get_secret_value()
    stamp = next(t for t in range(stamp, stamp + 1000) if "+" in sign(dev, t))
    url = DingtalkAdapter.signed_url(_Bare(), now_ms=stamp)  # type: ignore[arg-type]
    assert url.query["sign"] == sign(dev, stamp) and "+" not in url.raw_query_string


class _Bare:
    """Just enough of an adapter for signed_url, without opening a session."""

    url = "https://oapi.dingtalk.com/robot/send"
    credentials = DingtalkAdapter.Credentials()


@pytest.mark.unit
def test_declares_robot_rate_and_no_receipts() -> None:
    assert adapter_class("dingtalk") is DingtalkAdapter
    assert DingtalkAdapter.limits.rate_per_s == pytest.approx(20 / 60) and DingtalkAdapter.limits.body_maxlen == 20_000
    with pytest.raises(ReceiptRejected) as refused:
        DingtalkAdapter.parse_receipts(DingtalkAdapter.Credentials(), ReceiptRequest("POST", "/", {}, b"{}"))
    assert refused.value.status == 404
