"""The SendGrid adapter against its sandbox over HTTP on loopback: a table of cases, then the
Event Webhook's ECDSA signature both ways and receipt correlation by sg_message_id."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest
from connectors.channels.devkeys import dev_private_key
from connectors.channels.sendgrid import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SendgridAdapter,
    load_public_key,
    sign_events,
    verify_events,
)
from infra.settings import Settings
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

HEADERS = {"List-Unsubscribe": "<http://127.0.0.1/u/tok>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}

# case: (faults, wrong credentials?, channel overrides, message overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, {}, (DeliveryStatus.failed, "http_401", False)),
    "missing subject": ({}, False, {}, {"title": None}, (DeliveryStatus.failed, "http_400", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, {}, (DeliveryStatus.failed, "http_429", True)),
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
    faults, forged, channel, overrides, (status, code, retryable) = CASES[case]
    credentials = {"api_key": SecretStr("SG.wrong")} if forged else None
    message = {
        "address": "ann@example.org",
        "html": "<p>你好</p>",
        "extra": json.dumps({"headers": HEADERS}),
        **overrides,
    }
    channel = {"format": "email", "options": {"from": "Shop <news@shop.example>"}, **channel}
    result, box = send_once("sendgrid", tmp_path, faults=faults, credentials=credentials, message=message, **channel)
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s is not None and 0 <= result.retry_after_s <= 2
    if case == "success":
        assert result.provider_message_id == "sendgrid-0000000001"
        body = box.received[0].body
        assert body["personalizations"] == [{"to": [{"email": "ann@example.org"}], "custom_args": {"message_id": "m1"}}]
        assert body["from"] == {"email": "news@shop.example", "name": "Shop"} and body["subject"] == "Flash sale"
        assert body["content"] == [
            {"type": "text/plain", "value": "你好 — only 3 left"},
            {"type": "text/html", "value": "<p>你好</p>"},
        ]
        assert body["headers"] == HEADERS
    if case in ("auth failure", "missing subject"):
        assert box.rejected == 1 and not box.received


def test_receipts_correlate_and_signatures_verify_both_ways(tmp_path) -> None:
    async def run():
        async with ProviderHarness("sendgrid", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 1.0})
            adapter = h.adapter(format="email")
            bounced = await adapter.send(h.message(address="gone@example.org"))
            [receipt] = await h.receipts(1)  # "processed" is not terminal: only the bounce counts
            other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            body = b'[{"event":"delivered","sg_message_id":"x.filter"}]'
            forged = ReceiptRequest(
                "POST", "/", {SIGNATURE_HEADER: sign_events(other.decode(), body, "1"), TIMESTAMP_HEADER: "1"}, body
            )
            with pytest.raises(ReceiptRejected) as refused:
                SendgridAdapter.parse_receipts(h.credentials, forged)
            return bounced, receipt, refused.value.status, h.box.received[0].receipt_status

    sent, receipt, refused_status, sandbox_status = asyncio.run(run())
    assert receipt.provider_message_id == sent.provider_message_id
    assert (receipt.delivered, receipt.error_code, sandbox_status) == (False, "bounce", "undelivered")
    assert refused_status == 401


def test_delivered_receipt(tmp_path) -> None:
    async def run():
        async with ProviderHarness("sendgrid", tmp_path) as h:
            sent = await h.adapter(format="email").send(h.message(address="ann@example.org"))
            return sent, await h.receipts(1)

    sent, [receipt] = asyncio.run(run())
    assert receipt.provider_message_id == sent.provider_message_id and receipt.delivered


@pytest.mark.unit
def test_signature_and_key_formats(tmp_path) -> None:
    credentials = SendgridAdapter.credentials_from(Settings(home=tmp_path))
    pem = credentials.event_webhook_public_key
    der_b64 = load_public_key(pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private = dev_private_key(tmp_path, "sendgrid-event-webhook", "ec")
    body, ts = b'[{"event":"delivered"}]', "1700000000"
    signature = sign_events(private, body, ts)
    for key in (pem, base64.b64encode(der_b64).decode()):  # PEM, or base64 DER as the console shows it
        assert verify_events(key, body, signature, ts)
        assert not verify_events(key, body + b" ", signature, ts)
        assert not verify_events(key, body, signature, "1700000001")
        assert not verify_events(key, body, None, ts)


@pytest.mark.unit
def test_malformed_batch_is_refused(tmp_path) -> None:
    credentials = SendgridAdapter.credentials_from(Settings(home=tmp_path))
    private = dev_private_key(tmp_path, "sendgrid-event-webhook", "ec")
    body = b'{"event":"delivered"}'
    signed = ReceiptRequest(
        "POST", "/", {SIGNATURE_HEADER: sign_events(private, body, "1"), TIMESTAMP_HEADER: "1"}, body
    )
    with pytest.raises(ReceiptRejected) as refused:
        SendgridAdapter.parse_receipts(credentials, signed)
    assert refused.value.status == 400
