"""The APNs adapter against its sandbox over real HTTP/2 + TLS on loopback (and the HTTP/1.1 mirror)."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from connectors.channels import apns
from connectors.channels.apns import ApnsAdapter
from connectors.channels.base import DeliveryStatus, adapter_class
from connectors.channels.devkeys import public_key_pem
from connectors.channels.sandboxes.apns import h2_port
from connectors.channels.sandboxes.http2 import certificate_path
from infra.settings import Settings
from tests.connectors.channels.harness import ProviderHarness

pytestmark = pytest.mark.integration

DEVICE = "a1" * 32
TOPIC = "com.example.loopcast"


def other_ec_key() -> str:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )


def h2_adapter(h: ProviderHarness, credentials=None, **channel):
    options = {"topic": TOPIC, "ca_file": str(certificate_path(h.settings.home))}
    return h.adapter(credentials, url=f"https://127.0.0.1:{h2_port(h.settings)}", options=options, **channel)


# case: (faults, credentials change, channel overrides, message overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, None, {}, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, "key", {}, {}, (DeliveryStatus.failed, "InvalidProviderToken", False)),
    "wrong key id": ({}, "kid", {}, {}, (DeliveryStatus.failed, "InvalidProviderToken", False)),
    "throttled": ({"throttle_rate": 1.0}, None, {}, {}, (DeliveryStatus.failed, "TooManyRequests", True)),
    "outage": ({"outage": True}, None, {}, {}, (DeliveryStatus.failed, "ServiceUnavailable", True)),
    # APNs' answer is its status line: a 200 with an odd body is still accepted (the apns-id is ours).
    "malformed response": ({"malformed_rate": 1.0}, None, {}, {}, (DeliveryStatus.accepted, None, False)),
    "timeout": ({"latency_ms": 400}, None, {"timeout_s": 0.1}, {}, (DeliveryStatus.failed, "timeout", True)),
    "bad device token": ({}, None, {}, {"address": "u1"}, (DeliveryStatus.failed, "BadDeviceToken", False)),
    "unregistered": ({}, None, {}, {"address": "0" * 64}, (DeliveryStatus.failed, "Unregistered", False)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, change, channel, overrides, (status, code, retryable) = CASES[case]

    async def run():
        async with ProviderHarness("apns", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update=faults)
            credentials = None
            if change == "key":
                credentials = h.credentials.model_copy(update={"auth_key": SecretStr(other_ec_key())})
            elif change == "kid":
                credentials = h.credentials.model_copy(update={"key_id": "OTHERKEY01"})
            message = h.message(**{"address": DEVICE, "extra": '{"badge": 3}', **overrides})
            return await h2_adapter(h, credentials, format="push-apns", **channel).send(message), h.box

    result, box = asyncio.run(run())
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case in ("success", "malformed response"):
        assert result.provider_message_id == apns.apns_id("m1")
    if case == "success":
        item = box.received[0]
        assert item.provider_message_id == result.provider_message_id
        assert item.body["http_version"] == "2"  # really HTTP/2, negotiated by ALPN over TLS
        assert (item.body["device_token"], item.body["topic"], item.body["priority"]) == (DEVICE, TOPIC, "10")
        assert item.body["push_type"] == "alert" and int(item.body["expiration"]) > time.time()
        assert item.body["payload"] == {
            "aps": {"alert": {"title": "Flash sale", "body": "你好 — only 3 left"}, "sound": "default", "badge": 3},
            "message_id": "m1",
            "link": "http://127.0.0.1/c/abc",
        }
    if change:
        assert box.rejected == 1 and not box.received


def test_provider_token_is_reused_and_renewed_once_when_expired(tmp_path, monkeypatch) -> None:
    minted = []
    original = apns.provider_token
    monkeypatch.setattr(apns, "provider_token", lambda c, now=None: minted.append(now) or original(c, now))

    async def run():
        async with ProviderHarness("apns", tmp_path) as h:
            adapter = h2_adapter(h, format="push-apns")
            first = await adapter.send(h.message(address=DEVICE, priority="low"))
            second = await adapter.send(h.message(address=DEVICE, message_id="m2"))
            assert len(minted) == 1
            # A token minted over an hour ago: APNs answers 403 ExpiredProviderToken, the adapter re-mints once.
            adapter.token.value = original(adapter.credentials, int(time.time()) - 4000)
            third = await adapter.send(h.message(address=DEVICE, message_id="m3"))
            return first, second, third, h.box

    first, second, third, box = asyncio.run(run())
    assert all(r.status == DeliveryStatus.accepted for r in (first, second, third))
    assert len(minted) == 2 and box.rejected == 1
    assert [r.body["message_id"] for r in box.received] == ["m1", "m2", "m3"]
    assert box.received[0].body["priority"] == "5"


def test_http1_mirror_serves_the_same_api(tmp_path) -> None:
    async def run():
        async with ProviderHarness("apns", tmp_path) as h:
            adapter = h.adapter(format="push-apns", options={"topic": TOPIC})
            sent = await adapter.send(h.message(address=DEVICE))
            h.box.faults = h.box.faults.model_copy(update={"throttle_rate": 1.0})
            throttled = await adapter.send(h.message(address=DEVICE, message_id="m2"))
            return sent, throttled, h.box

    sent, throttled, box = asyncio.run(run())
    assert sent.status == DeliveryStatus.accepted and box.received[0].body["http_version"] == "1.1"
    assert (throttled.error_code, throttled.retryable, throttled.retry_after_s) == ("TooManyRequests", True, 1)


@pytest.mark.unit
def test_provider_token_claims(tmp_path) -> None:
    credentials = ApnsAdapter.credentials_from(Settings(home=tmp_path))
    token = apns.provider_token(credentials, now=1_700_000_000)
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "SANDBOXKEY", "typ": "JWT"}
    public = public_key_pem(credentials.auth_key.get_secret_value())
    assert jwt.decode(token, public, algorithms=["ES256"]) == {"iss": "LOOPCASTDV", "iat": 1_700_000_000}


@pytest.mark.unit
def test_topic_is_required_and_apns_id_is_stable() -> None:
    from schemas.config import Channel

    with pytest.raises(ValueError, match="topic"):
        ApnsAdapter(Channel(id="ch", provider="apns", format="push-apns"), ApnsAdapter.Credentials())
    assert apns.apns_id("m1") == apns.apns_id("m1") != apns.apns_id("m2")
    assert adapter_class("apns") is ApnsAdapter and ApnsAdapter.sends_receipts is False
