"""The Twilio adapter against its sandbox over real HTTP on loopback: a table of cases, then signed status
callbacks both ways (to Loopcast's endpoint and to a per-request StatusCallback) and receipt correlation."""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest, adapter_class
from connectors.channels.twilio import SIGNATURE_HEADER, TwilioAdapter, signature, verify
from schemas.config import Channel
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

PHONE = "+15005550006"
OPTIONS = {"from": "+15005550001"}

# case: (faults, wrong credentials?, channel overrides, message overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, {}, (DeliveryStatus.failed, "20003", False)),
    "invalid To": ({}, False, {}, {"address": "u1"}, (DeliveryStatus.failed, "21211", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, {}, (DeliveryStatus.failed, "20429", True)),
    "outage": ({"outage": True}, False, {}, {}, (DeliveryStatus.failed, "20503", True)),
    "server error": ({"error_rate": 1.0}, False, {}, {}, (DeliveryStatus.failed, "20500", True)),
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
    faults, forged, channel, overrides, (status, code, retryable) = CASES[case]
    credentials = {"auth_token": SecretStr("wrong")} if forged else None
    channel = {"format": "sms", "options": OPTIONS, **channel}
    message = {"address": PHONE, **overrides}
    result, box = send_once("twilio", tmp_path, faults=faults, credentials=credentials, message=message, **channel)
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        assert result.provider_message_id.startswith("SM") and len(result.provider_message_id) == 34
        [arrived] = box.received
        assert arrived.body == {"To": PHONE, "From": "+15005550001", "Body": "你好 — only 3 left"}
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


@pytest.mark.parametrize("own_callback", [False, True])
def test_status_callbacks_are_signed_and_correlate(own_callback: bool, tmp_path) -> None:
    """Twilio posts `sent`, then the final status; only the final one is a receipt. With a StatusCallback
    (carrying a query string, which the signature covers) it posts there instead of the account default."""

    async def run():
        async with ProviderHarness("twilio", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 1.0 if own_callback else 0.0})
            options = dict(OPTIONS)
            if own_callback:
                options["status_callback"] = f"{h.settings.http_base}/receipts/twilio?channel=ch"
            sent = await h.adapter(format="sms", options=options).send(h.message(address=PHONE))
            [receipt] = await h.receipts(1)
            return sent, receipt, h.refused, h.box.received[0].body

    sent, receipt, refused, arrived = asyncio.run(run())
    assert receipt.provider_message_id == sent.provider_message_id
    assert not refused
    if own_callback:
        assert arrived["StatusCallback"].endswith("/receipts/twilio?channel=ch")
        assert (receipt.delivered, receipt.error_code) == (False, "30003")
    else:
        assert "StatusCallback" not in arrived
        assert (receipt.delivered, receipt.error_code) == (True, None)


@pytest.mark.unit
def test_forged_and_intermediate_callbacks() -> None:
    credentials = TwilioAdapter.Credentials()
    token = credentials.auth_token.get_secret_value()
    url = "https://loopcast.example/receipts/twilio"

    def call(fields: dict[str, str], key: str) -> ReceiptRequest:
        header = signature(key, url, fields.items())
        return ReceiptRequest("POST", url, {SIGNATURE_HEADER: header}, urlencode(fields).encode())

    final = {"MessageSid": "SM1", "MessageStatus": "failed", "ErrorCode": "30006"}
    with pytest.raises(ReceiptRejected) as refused:
        TwilioAdapter.parse_receipts(credentials, call(final, "wrong"))
    assert refused.value.status == 401
    tampered = call(final, token)
    tampered = ReceiptRequest("POST", url, tampered.headers, tampered.body.replace(b"failed", b"delivered"))
    with pytest.raises(ReceiptRejected):
        TwilioAdapter.parse_receipts(credentials, tampered)
    assert TwilioAdapter.parse_receipts(credentials, call({"MessageSid": "SM1", "MessageStatus": "sent"}, token)) == []
    [receipt] = TwilioAdapter.parse_receipts(credentials, call(final, token))
    assert (receipt.provider_message_id, receipt.delivered, receipt.error_code) == ("SM1", False, "30006")


@pytest.mark.unit
def test_signature_matches_twilios_documented_example() -> None:
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert signature("12345", url, params.items()) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    # A proxy that adds the default port must not break verification.
    assert verify(
        "12345",
        "https://mycompany.com:443/myapp.php?foo=1&bar=2",
        list(params.items()),
        signature("12345", url, params.items()),
    )


@pytest.mark.unit
def test_registry_and_options() -> None:
    assert adapter_class("twilio") is TwilioAdapter
    with pytest.raises(ValueError, match="from"):
        TwilioAdapter(Channel(id="ch", provider="twilio", format="sms"), TwilioAdapter.Credentials())
