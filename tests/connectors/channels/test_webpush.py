"""The Web Push adapter against a push-service sandbox that verifies VAPID and decrypts like a browser."""

from __future__ import annotations

import asyncio
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from connectors.channels import webpush
from connectors.channels.base import DeliveryStatus, adapter_class
from connectors.channels.sandboxes.webpush import verify_vapid
from connectors.channels.webpush import WebPushAdapter
from infra.settings import Settings
from tests.connectors.channels.harness import ProviderHarness

pytestmark = pytest.mark.integration


def other_ec_key() -> str:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )


async def subscribe(h: ProviderHarness, expired: bool = False) -> str:
    """What the browser hands the app after pushManager.subscribe(), as the user's address."""
    client = h.box.client()
    async with client.post(f"{h.base_url}/_subscriptions") as response:
        subscription = await response.json()
    if expired:
        sub_id = subscription["endpoint"].rsplit("/", 1)[1]
        async with client.post(f"{h.base_url}/_subscriptions/{sub_id}/expire") as response:
            assert response.status == 200
    return json.dumps(subscription)


# case: (faults, wrong VAPID key?, channel overrides, address kind) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, "live", (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, "live", (DeliveryStatus.failed, "vapid_rejected", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, "live", (DeliveryStatus.failed, "http_429", True)),
    "outage": ({"outage": True}, False, {}, "live", (DeliveryStatus.failed, "http_503", True)),
    "malformed response": (
        {"malformed_rate": 1.0},
        False,
        {},
        "live",
        (DeliveryStatus.failed, "malformed_response", False),
    ),
    "timeout": ({"latency_ms": 400}, False, {"timeout_s": 0.1}, "live", (DeliveryStatus.failed, "timeout", True)),
    "subscription gone": ({}, False, {}, "expired", (DeliveryStatus.failed, "subscription_gone", False)),
    "unknown subscription": ({}, False, {}, "unknown", (DeliveryStatus.failed, "subscription_not_found", False)),
    "not a subscription": ({}, False, {}, "garbage", (DeliveryStatus.failed, "invalid_subscription", False)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, forged, channel, kind, (status, code, retryable) = CASES[case]

    async def run():
        async with ProviderHarness("webpush", tmp_path) as h:
            address = "not json" if kind == "garbage" else await subscribe(h, expired=kind == "expired")
            if kind == "unknown":
                address = address.replace("/push/", "/push/0")
            h.box.faults = h.box.faults.model_copy(update=faults)
            credentials = (
                h.credentials.model_copy(update={"vapid_private_key": SecretStr(other_ec_key())}) if forged else None
            )
            adapter = h.adapter(credentials, format="push-fcm", options={"ttl_s": "600", "topic": "sale"}, **channel)
            return await adapter.send(h.message(address=address, extra='{"badge": 1}')), h.box

    result, box = asyncio.run(run())
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        [item] = box.received
        assert result.provider_message_id.endswith(f"/webpush/m/{item.provider_message_id}")
        # The sandbox decrypted the aes128gcm body with the subscription's private key.
        assert {k: item.body[k] for k in ("message_id", "title", "body", "link", "badge")} == {
            "message_id": "m1",
            "title": "Flash sale",
            "body": "你好 — only 3 left",
            "link": "http://127.0.0.1/c/abc",
            "badge": 1,
        }
        assert (item.body["ttl"], item.body["urgency"], item.body["topic"]) == ("600", "high", "sale")
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


def test_vapid_token_is_reused_per_push_service(tmp_path) -> None:
    async def run():
        async with ProviderHarness("webpush", tmp_path) as h:
            adapter = h.adapter(format="push-fcm")
            first = await adapter.send(h.message(address=await subscribe(h), priority="low"))
            second = await adapter.send(h.message(address=await subscribe(h), message_id="m2"))
            return first, second, h.box, adapter

    first, second, box, adapter = asyncio.run(run())
    assert first.status == second.status == DeliveryStatus.accepted
    assert len(adapter._vapid) == 1 and [r.body["urgency"] for r in box.received] == ["low", "high"]


def test_payload_over_4096_encrypted_bytes_is_refused_before_sending(tmp_path) -> None:
    async def run():
        async with ProviderHarness("webpush", tmp_path) as h:
            address = await subscribe(h)
            adapter = h.adapter(format="push-fcm")
            fits = await adapter.send(h.message(address=address, body="x" * (webpush.MAX_PLAINTEXT_BYTES - 200)))
            too_big = await adapter.send(h.message(address=address, body="x" * webpush.MAX_PLAINTEXT_BYTES))
            return fits, too_big, h.box

    fits, too_big, box = asyncio.run(run())
    assert fits.status == DeliveryStatus.accepted and len(box.received) == 1
    assert (too_big.status, too_big.error_code, too_big.retryable) == (
        DeliveryStatus.failed,
        "payload_too_large",
        False,
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("audience", "shift_s", "lifetime_s", "tamper", "ok"),
    [
        ("http://push.test", 0, None, False, True),
        ("http://other.test", 0, None, False, False),  # aud is not this push service
        ("http://push.test", 13 * 3600, None, False, False),  # expired
        ("http://push.test", 0, 30 * 3600, False, False),  # exp more than 24 h away
        ("http://push.test", 0, None, True, False),  # signature does not verify
    ],
)
def test_sandbox_verifies_vapid(tmp_path, audience, shift_s, lifetime_s, tamper, ok) -> None:
    pem = WebPushAdapter.credentials_from(Settings(home=tmp_path)).vapid_private_key.get_secret_value()
    now = int(time.time())
    header = webpush.vapid_header(pem, audience, "mailto:a@b.test", now=now)
    if lifetime_s:
        token = jwt.encode(
            {"aud": audience, "exp": now + lifetime_s, "sub": "mailto:a@b.test"},
            serialization.load_pem_private_key(pem.encode(), None),
            algorithm="ES256",
        )
        header = f"vapid t={token},{header.split(',', 1)[1]}"
    if tamper:
        header = header.replace("t=", "t=x", 1)
    assert (verify_vapid(header, "http://push.test", now=now + shift_s) is None) is ok


@pytest.mark.unit
def test_registry_and_credentials(tmp_path) -> None:
    assert adapter_class("webpush") is WebPushAdapter and WebPushAdapter.sends_receipts is False
    key = other_ec_key()
    credentials = WebPushAdapter.credentials_from(
        Settings(home=tmp_path, providers={"webpush": {"vapid_private_key": key}})
    )
    assert credentials.vapid_private_key.get_secret_value() == key
