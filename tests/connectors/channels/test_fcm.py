"""The FCM adapter against its sandbox (OAuth token endpoint + HTTP v1 send) over real HTTP on loopback."""

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
from infra.settings import Settings
from tests.connectors.channels.harness import ProviderHarness, send_once

pytestmark = pytest.mark.integration

TOKEN = "fcm-device-token-1"


def other_rsa_key() -> str:
    key = rsa.generate_private_key(65537, 2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


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
    credentials = {"private_key": SecretStr(other_rsa_key())} if forged else None
    message = {"address": TOKEN, "extra": '{"badge": 1}', **overrides}
    result, box = send_once(
        "fcm", tmp_path, faults=faults, credentials=credentials, message=message, format="push-fcm", **channel
    )
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "throttled":
        assert result.retry_after_s == 1
    if case == "success":
        item = box.received[0]
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
            adapter = h.adapter(format="push-fcm", options={"project_id": "other-project"})
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
