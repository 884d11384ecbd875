"""The SendGrid adapter against its sandbox over HTTP on loopback: a table of cases, the Event
Webhook's ECDSA signature both ways, receipt correlation by sg_message_id and our message_id, and
batches (`batch_max`) as personalizations of one Mail Send request."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus, ReceiptRejected, ReceiptRequest
from connectors.channels.devkeys import dev_private_key
from connectors.channels.sendgrid import (
    SIGNATURE_HEADER,
    SUBSTITUTIONS_MOST,
    TIMESTAMP_HEADER,
    SendgridAdapter,
    load_public_key,
    sign_events,
    verify_events,
)
from infra.settings import Settings
from tests.connectors.channels.harness import ProviderHarness, assert_refuses_batch_max, send_once

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
        assert result.provider_message_id == "sendgrid-0000000001:m1"  # X-Message-Id:message_id
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


BATCH = {"from": "Shop <news@shop.example>", "batch_max": "1000"}


def test_a_batch_goes_as_one_request_and_each_receipt_finds_its_own_message(tmp_path) -> None:
    async def run():
        async with ProviderHarness("sendgrid", tmp_path) as h:
            # Seeded: about half bounce, each by its own message_id, so a mix-up would show.
            h.box.faults = h.box.faults.model_copy(update={"undelivered_rate": 0.5, "seed": 1})
            adapter = h.adapter(format="email", options=BATCH)
            messages = [
                h.message(
                    message_id=f"m{i}",
                    address=f"u{i}@example.org",
                    title=f"Hi {i}",
                    body=f"你好 {i}",
                    html=f"<p>{i}</p>",
                    extra=json.dumps({"headers": HEADERS}) if i == 0 else None,
                )
                for i in range(5)
            ]
            results = await h.send_together(adapter, messages)
            return results, await h.receipts(5), h.box.received

    results, receipts, arrived = asyncio.run(run())
    [x_message_id] = {a.provider_message_id for a in arrived}  # one request: one X-Message-Id
    assert [r.provider_message_id for r in results] == [f"{x_message_id}:m{i}" for i in range(5)]
    assert [
        (a.body["message_id"], a.body["to"], a.body["subject"], a.body["text"], a.body["html"], a.body["batch"])
        for a in arrived
    ] == [(f"m{i}", f"u{i}@example.org", f"Hi {i}", f"你好 {i}", f"<p>{i}</p>", True) for i in range(5)]
    assert arrived[0].body["headers"] == HEADERS and not any("headers" in a.body for a in arrived[1:])
    fates = {f"{x_message_id}:{a.body['message_id']}": a.receipt_status == "delivered" for a in arrived}
    assert {r.provider_message_id: r.delivered for r in receipts} == fates
    assert set(fates.values()) == {True, False}


def test_html_and_plain_messages_go_in_separate_requests(tmp_path) -> None:
    async def run():
        async with ProviderHarness("sendgrid", tmp_path) as h:
            adapter = h.adapter(format="email", options=BATCH)
            messages = [
                h.message(message_id=f"m{i}", address=f"u{i}@example.org", html="<p>hi</p>" if i % 2 else None)
                for i in range(4)
            ]
            return await h.send_together(adapter, messages), h.box.received

    results, arrived = asyncio.run(run())
    requests = {}
    for a in arrived:
        requests.setdefault(a.provider_message_id, []).append((a.body["message_id"], a.body["html"]))
    assert sorted(requests.values()) == [[("m0", None), ("m2", None)], [("m1", "<p>hi</p>"), ("m3", "<p>hi</p>")]]
    assert all(a.body["batch"] and a.body["text"] == "你好 — only 3 left" for a in arrived)
    assert [r.provider_message_id for r in results] == [
        f"{a.provider_message_id}:{a.body['message_id']}" for a in sorted(arrived, key=lambda a: a.body["message_id"])
    ]


def test_a_body_past_the_substitutions_limit_goes_alone(tmp_path) -> None:
    big = "x" * SUBSTITUTIONS_MOST

    async def run():
        async with ProviderHarness("sendgrid", tmp_path) as h:
            adapter = h.adapter(format="email", options=BATCH)
            bodies = ["short", big, "also short"]
            messages = [
                h.message(message_id=f"m{i}", address=f"u{i}@example.org", body=b) for i, b in enumerate(bodies)
            ]
            return await h.send_together(adapter, messages), h.box.received

    results, arrived = asyncio.run(run())
    assert all(r.status is DeliveryStatus.accepted for r in results)
    batched = [a for a in arrived if a.body.get("batch")]
    [alone] = [a for a in arrived if not a.body.get("batch")]
    assert [(a.body["message_id"], a.body["text"]) for a in batched] == [("m0", "short"), ("m2", "also short")]
    # The big one went the ordinary way: its body as the content itself, in a request of its own.
    assert alone.body["content"][0]["value"] == big and alone.provider_message_id != batched[0].provider_message_id
    assert results[1].provider_message_id == f"{alone.provider_message_id}:m1"


def test_an_address_twice_in_one_turn_goes_in_two_requests(tmp_path) -> None:
    async def run():
        async with ProviderHarness("sendgrid", tmp_path) as h:
            adapter = h.adapter(format="email", options=BATCH)
            addresses = ["ann@example.org", "Ann@Example.org", "bob@example.org"]
            messages = [h.message(message_id=f"m{i}", address=a) for i, a in enumerate(addresses)]
            return await h.send_together(adapter, messages), h.box.received, h.box.rejected

    results, arrived, rejected = asyncio.run(run())
    assert all(r.status is DeliveryStatus.accepted for r in results) and not rejected
    assert sorted((a.body["message_id"], a.body.get("batch", False)) for a in arrived) == [
        ("m0", True),
        ("m1", False),  # alone in its request, sent the ordinary way
        ("m2", True),
    ]
    assert len({r.provider_message_id for r in results}) == 3


def test_a_refused_batch_fails_every_message_in_it(tmp_path) -> None:
    async def run():
        async with ProviderHarness("sendgrid", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update={"throttle_rate": 1.0})
            adapter = h.adapter(format="email", options=BATCH)
            messages = [h.message(message_id=f"m{i}", address=f"u{i}@example.org") for i in range(3)]
            return await h.send_together(adapter, messages), h.box

    results, box = asyncio.run(run())
    assert [(r.status, r.error_code, r.retryable) for r in results] == [(DeliveryStatus.failed, "http_429", True)] * 3
    assert all(r.retry_after_s is not None and 0 <= r.retry_after_s <= 2 for r in results)
    assert box.faulted == 1 and not box.received  # one request refused, not three


def test_the_sandbox_refuses_what_sendgrid_refuses(tmp_path) -> None:
    def personalization(i: int, **more) -> dict:
        return {"to": [{"email": f"u{i}@example.org"}], **more}

    base = {"from": {"email": "news@shop.example"}, "subject": "Hi", "content": [{"type": "text/plain", "value": "x"}]}
    cases = {
        "personalizations": [personalization(i) for i in range(1001)],
        "personalizations.1.substitutions": [
            personalization(0),
            personalization(1, substitutions={"-t-": "x" * SUBSTITUTIONS_MOST}),
        ],
        "personalizations.1.to": [personalization(0), personalization(0)],
    }

    async def run():
        async with ProviderHarness("sendgrid", tmp_path) as h:
            headers = {"Authorization": f"Bearer {h.credentials.api_key.get_secret_value()}"}
            answered = []
            async with aiohttp.ClientSession() as session:
                for personalizations in cases.values():
                    body = {**base, "personalizations": personalizations}
                    async with session.post(f"{h.base_url}/v3/mail/send", json=body, headers=headers) as response:
                        answered.append((response.status, (await response.json())["errors"][0]["field"]))
            return answered, h.box

    answered, box = asyncio.run(run())
    assert answered == [(400, field) for field in cases]
    assert box.rejected == 3 and not box.received


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "1001", "many"])
def test_batch_max_is_what_mail_send_takes(value: str) -> None:
    assert_refuses_batch_max("sendgrid", value, "email")


@pytest.mark.unit
def test_receipt_ids_from_sg_message_id_and_message_id(tmp_path) -> None:
    credentials = SendgridAdapter.credentials_from(Settings(home=tmp_path))
    private = dev_private_key(tmp_path, "sendgrid-event-webhook", "ec")
    events = [
        {"event": "delivered", "sg_message_id": "X1.filter-0.0", "message_id": "m1"},
        {"event": "bounce", "sg_message_id": "X1.filter-1.0", "message_id": "m2", "type": "blocked"},
        {"event": "processed", "sg_message_id": "X1.filter-2.0", "message_id": "m3"},
        {"event": "delivered", "sg_message_id": "X0.filter-0.0"},  # sent before ids carried the message_id
    ]
    body = json.dumps(events).encode()
    signed = ReceiptRequest(
        "POST", "/", {SIGNATURE_HEADER: sign_events(private, body, "1"), TIMESTAMP_HEADER: "1"}, body
    )
    receipts = SendgridAdapter.parse_receipts(credentials, signed)
    assert [(r.provider_message_id, r.delivered, r.error_code) for r in receipts] == [
        ("X1:m1", True, None),
        ("X1:m2", False, "blocked"),
        ("X0", True, None),
    ]


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
