"""The FCM adapter against its sandbox (OAuth token endpoint + HTTP v1 send) over real HTTP/2 + TLS on loopback
(and the HTTP/1.1 mirror)."""

from __future__ import annotations

import asyncio

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from connectors.channels import fcm
from connectors.channels.base import DeliveryStatus, adapter_class
from connectors.channels.devkeys import public_key_pem
from connectors.channels.fcm import FcmAdapter
from connectors.channels.sandboxes.fcm import h2_port
from connectors.channels.sandboxes.http2 import certificate_path
from infra.settings import Settings
from schemas.config import Channel
from tests.connectors.channels.harness import ProviderHarness

pytestmark = pytest.mark.integration

TOKEN = "fcm-device-token-1"


def other_rsa_key() -> str:
    key = rsa.generate_private_key(65537, 2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def h2_adapter(h: ProviderHarness, credentials=None, options=None, **channel):
    """An adapter on the sandbox's HTTP/2 port, trusting the sandbox's certificate."""
    options = {"ca_file": str(certificate_path(h.settings.home)), **(options or {})}
    url = f"https://127.0.0.1:{h2_port(h.settings)}"
    return h.adapter(credentials, url=url, options=options, format="push-fcm", **channel)


# case: (faults, wrong service account key?, channel overrides, message overrides) → (status, code, retryable)
CASES = {
    "success": ({}, False, {}, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, {}, (DeliveryStatus.failed, "invalid_grant", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, {}, (DeliveryStatus.failed, "QUOTA_EXCEEDED", True)),
    "outage": ({"outage": True}, False, {}, {}, (DeliveryStatus.failed, "UNAVAILABLE", True)),
    "internal error": ({"error_rate": 1.0}, False, {}, {}, (DeliveryStatus.failed, "INTERNAL", True)),
    "malformed response": (
        {"malformed_rate": 1.0},
        False,
        {},
        {},
        (DeliveryStatus.failed, "malformed_response", False),
    ),
    "timeout": ({"latency_ms": 400}, False, {"timeout_s": 0.1}, {}, (DeliveryStatus.failed, "timeout", True)),
    "unregistered": ({}, False, {}, {"address": "unregistered-1"}, (DeliveryStatus.failed, "UNREGISTERED", False)),
}


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, forged, channel, overrides, (status, code, retryable) = CASES[case]

    async def run():
        async with ProviderHarness("fcm", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update=faults)
            credentials = None
            if forged:
                credentials = h.credentials.model_copy(update={"private_key": SecretStr(other_rsa_key())})
            message = h.message(**{"address": TOKEN, "extra": '{"badge": 1}', **overrides})
            return await h2_adapter(h, credentials, **channel).send(message), h.box

    result, box = asyncio.run(run())
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        item = box.received[0]
        assert item.body["http_version"] == "2"  # really HTTP/2, negotiated by ALPN over TLS
        assert result.provider_message_id == f"projects/loopcast-sandbox/messages/{item.provider_message_id}"
        assert item.body["token"] == TOKEN and item.body["message_id"] == "m1"
        assert item.body["notification"] == {"title": "Flash sale", "body": "你好 — only 3 left"}
        assert item.body["data"] == {"message_id": "m1", "link": "http://127.0.0.1/c/abc"}
        assert item.body["android"]["priority"] == "HIGH"
        assert item.body["apns"]["payload"]["aps"]["badge"] == 1
    if case == "auth failure":
        assert box.rejected == 1 and not box.received


def test_token_is_cached_and_refreshed_once_on_401(tmp_path, monkeypatch) -> None:
    signed = []
    original = fcm.assertion
    monkeypatch.setattr(fcm, "assertion", lambda credentials: signed.append(1) or original(credentials))

    async def run():
        async with ProviderHarness("fcm", tmp_path) as h:
            adapter = h2_adapter(h, options={"project_id": "other-project"})
            first = await adapter.send(h.message(address=TOKEN))
            second = await adapter.send(h.message(address=TOKEN, message_id="m2"))
            assert len(signed) == 1  # one token for both sends
            adapter.token.value = "ya29.revoked"  # FCM answers 401 UNAUTHENTICATED for it
            third = await adapter.send(h.message(address=TOKEN, message_id="m3"))
            return first, second, third, h.box, adapter

    first, second, third, box, adapter = asyncio.run(run())
    assert all(r.status == DeliveryStatus.accepted for r in (first, second, third))
    assert first.provider_message_id.startswith("projects/other-project/messages/")
    assert len(signed) == 2 and box.rejected == 1 and adapter.token.value != "ya29.revoked"
    assert [r.body["message_id"] for r in box.received] == ["m1", "m2", "m3"]


def test_concurrent_sends_are_streams_of_few_http2_connections(tmp_path) -> None:
    count = 50

    async def run():
        async with ProviderHarness("fcm", tmp_path) as h:
            # The sandbox holds every answer until all `count` requests are in flight at once: over HTTP/1.1 that
            # would take `count` connections, so arriving on a few proves the sends were multiplexed.
            in_flight, all_in = 0, asyncio.Event()
            inject = h.box.inject

            async def gated(answer=None):
                nonlocal in_flight
                in_flight += 1
                if in_flight == count:
                    all_in.set()
                await all_in.wait()
                return await inject(answer)

            h.box.inject = gated
            adapter = h2_adapter(h)
            messages = [h.message(address=f"{TOKEN}-{i}", message_id=f"m{i}") for i in range(count)]
            results = await asyncio.wait_for(asyncio.gather(*(adapter.send(m) for m in messages)), 10)
            return results, h.box

    results, box = asyncio.run(run())
    assert all(r.status == DeliveryStatus.accepted for r in results)
    items = {item.body["message_id"]: item for item in box.received}
    assert len(items) == count
    for i, result in enumerate(results):
        item = items[f"m{i}"]
        assert result.provider_message_id == f"projects/loopcast-sandbox/messages/{item.provider_message_id}"
        assert item.body["token"] == f"{TOKEN}-{i}" and item.body["http_version"] == "2"
    assert 1 <= len({item.body["connection"] for item in items.values()}) <= fcm.H2_CONNECTIONS


def test_http1_mirror_and_the_http2_opt_out(tmp_path) -> None:
    async def run():
        async with ProviderHarness("fcm", tmp_path) as h:
            adapter = h.adapter(format="push-fcm", options={"http2": "false"})  # the plain /fcm url
            sent = await adapter.send(h.message(address=TOKEN))
            h.box.faults = h.box.faults.model_copy(update={"throttle_rate": 1.0})
            throttled = await adapter.send(h.message(address=TOKEN, message_id="m2"))
            return sent, throttled, h.box

    sent, throttled, box = asyncio.run(run())
    item = box.received[0]
    assert sent.status == DeliveryStatus.accepted and sent.provider_message_id.endswith(item.provider_message_id)
    assert (item.body["http_version"], item.body["connection"]) == ("1.1", None)
    assert (throttled.error_code, throttled.retryable, throttled.retry_after_s) == ("QUOTA_EXCEEDED", True, 1)


@pytest.mark.unit
def test_http2_option_must_be_a_flag() -> None:
    channel = Channel(id="ch", provider="fcm", format="push-fcm", options={"http2": "maybe"})
    with pytest.raises(ValueError, match="true/false"):
        FcmAdapter(channel, FcmAdapter.Credentials(private_key=SecretStr(other_rsa_key())))


@pytest.mark.unit
def test_assertion_is_a_service_account_jwt(tmp_path) -> None:
    credentials = FcmAdapter.credentials_from(Settings(home=tmp_path, sandbox_port=18999))
    assert credentials.token_uri == "http://127.0.0.1:18999/fcm/token"
    token = fcm.assertion(credentials, now=1_700_000_000)
    claims = jwt.decode(
        token,
        public_key_pem(credentials.private_key.get_secret_value()),
        algorithms=["RS256"],
        audience=credentials.token_uri,
        options={"verify_exp": False},
    )
    assert claims["iss"] == credentials.client_email and claims["scope"] == fcm.SCOPE
    assert claims["exp"] - claims["iat"] == 3600


@pytest.mark.unit
def test_configured_service_account_is_kept(tmp_path) -> None:
    key = other_rsa_key()
    settings = Settings(home=tmp_path, providers={"fcm": {"private_key": key, "project_id": "prod"}})
    credentials = FcmAdapter.credentials_from(settings)
    assert credentials.private_key.get_secret_value() == key
    assert credentials.token_uri == fcm.GOOGLE_TOKEN_URI and credentials.project_id == "prod"
    assert not (tmp_path / "dev-keys").exists()
    assert FcmAdapter.sends_receipts is False


@pytest.mark.unit
def test_error_codes_come_from_fcm_error_details() -> None:
    body = (
        '{"error": {"code": 404, "message": "x", "status": "NOT_FOUND", "details": '
        '[{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}}'
    )
    assert fcm.fcm_error(body) == "UNREGISTERED"
    assert fcm.fcm_error('{"error": {"code": 401, "status": "UNAUTHENTICATED"}}') == "UNAUTHENTICATED"
    assert fcm.fcm_error("<html>") is None


@pytest.mark.unit
def test_registry_finds_fcm() -> None:
    assert adapter_class("fcm") is FcmAdapter
