"""The generic HTTP SMS gateway adapter against its sandbox over real HTTP on loopback: a table of cases,
then the shared HMAC signature both ways, DLR states and receipt correlation."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.http_sms import HttpSmsAdapter, signed_headers, verify
from schemas.config import Channel
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

PHONE = "+6591234567"
WRONG_SECRET = {"api_secret": SecretStr("wrong")}
WRONG_KEY = {"api_key": "someone-else"}

# case: (faults, credential changes, channel overrides, message overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, {}, {}, {}, (DeliveryStatus.accepted, None, False)),
    "bad signature": ({}, WRONG_SECRET, {}, {}, (DeliveryStatus.failed, "invalid_signature", False)),
    "unknown key": ({}, WRONG_KEY, {}, {}, (DeliveryStatus.failed, "invalid_api_key", False)),
    "invalid number": ({}, {}, {}, {"address": "u1"}, (DeliveryStatus.failed, "invalid_number", False)),
    "throttled": ({"throttle_rate": 1.0}, {}, {}, {}, (DeliveryStatus.failed, "rate_limited", True)),
    "outage": ({"outage": True}, {}, {}, {}, (DeliveryStatus.failed, "unavailable", True)),
    "malformed response": ({"malformed_rate": 1.0}, {}, {}, {}, (DeliveryStatus.failed, "malformed_response", False)),
    "timeout": ({"latency_ms": 400}, {}, {"timeout_s": 0.1}, {}, (DeliveryStatus.failed, "timeout", True)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, changes, channel, overrides, (status, code, retryable) = CASES[case]
    channel = {"format": "sms", "brand": "Loopcast", **channel}
    message = {"address": PHONE, **overrides}
    result, box = send_once("http-sms", tmp_path, faults=faults, credentials=changes, message=message, **channel)
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        assert result.provider_message_id == "http-sms-0000000001"
        [arrived] = box.received
        assert arrived.body == {
            "to": PHONE,
            "text": "你好 — only 3 left",
            "sender": "Loopcast",
            "ref": "m1",
            "message_id": "m1",
        }
    if case in ("bad signature", "unknown key"):
        assert box.rejected == 1 and not box.received


def test_dlr_correlates_on_a_custom_path(tmp_path) -> None:
    async def run():
        async with ProviderHarness("http-sms", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 1.0})
            adapter = h.adapter(format="sms", options={"path": "api/v2/sms", "sender": "LOOP"})
            sent = await adapter.send(h.message(address=PHONE))
            [receipt] = await h.receipts(1)
            return sent, receipt, h.refused, h.box.received[0].body

    sent, receipt, refused, arrived = asyncio.run(run())
    assert receipt.provider_message_id == sent.provider_message_id
    assert (receipt.delivered, receipt.error_code) == (False, "UNDELIV:001")
    assert not refused and arrived["sender"] == "LOOP"


@pytest.mark.unit
def test_dlr_signature_states_and_replays() -> None:
    credentials = HttpSmsAdapter.Credentials()
    secret = credentials.api_secret.get_secret_value()

    def call(dlr: dict, key: str = secret, timestamp: int | None = None) -> ReceiptRequest:
        body = json.dumps(dlr).encode()
        return ReceiptRequest("POST", "/", signed_headers(credentials.api_key, key, body, timestamp), body)

    for forged in (
        call({"id": "1", "status": "DELIVRD"}, "wrong"),
        call({"id": "1", "status": "DELIVRD"}, timestamp=1),
    ):
        with pytest.raises(ReceiptRejected) as refused:
            HttpSmsAdapter.parse_receipts(credentials, forged)
        assert refused.value.status == 401
    assert HttpSmsAdapter.parse_receipts(credentials, call({"id": "1", "status": "ENROUTE"})) == []
    [expired] = HttpSmsAdapter.parse_receipts(credentials, call({"id": "1", "status": "EXPIRED"}))
    assert (expired.delivered, expired.error_code) == (False, "EXPIRED")
    [delivered] = HttpSmsAdapter.parse_receipts(credentials, call({"id": "1", "status": "DELIVRD", "err": "000"}))
    assert (delivered.delivered, delivered.error_code) == (True, None)
    with pytest.raises(ReceiptRejected) as malformed:
        HttpSmsAdapter.parse_receipts(credentials, call({"status": "DELIVRD"}))
    assert malformed.value.status == 400


@pytest.mark.unit
def test_signature_covers_timestamp_and_body() -> None:
    headers = signed_headers("k", "s", b"{}", 1_700_000_000)
    assert verify("s", b"{}", headers["X-Timestamp"], headers["X-Signature"], now=1_700_000_000)
    assert not verify("s", b"{} ", headers["X-Timestamp"], headers["X-Signature"], now=1_700_000_000)
    assert not verify("s", b"{}", "1700000001", headers["X-Signature"], now=1_700_000_000)
    assert not verify("s", b"{}", headers["X-Timestamp"], headers["X-Signature"], now=1_700_003_600)


@pytest.mark.unit
def test_registry_and_options() -> None:
    assert adapter_class("http-sms") is HttpSmsAdapter
    with pytest.raises(ValueError, match="url"):
        HttpSmsAdapter(Channel(id="ch", provider="http-sms", format="sms"), HttpSmsAdapter.Credentials())
