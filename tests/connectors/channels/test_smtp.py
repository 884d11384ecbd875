"""The SMTP adapter against the sandbox relay (aiosmtpd with AUTH) over real SMTP on loopback:
a table of cases, then what arrived (MIME parts, headers), connection reuse and reconnection."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import SecretStr

from connectors.channels.base import DeliveryStatus
from connectors.channels.smtp import SmtpAdapter, build_email, message_id_header
from tests.connectors.channels.harness import ProviderHarness, message

pytestmark = pytest.mark.integration

HEADERS = {"List-Unsubscribe": "<http://127.0.0.1/u/tok>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}

# case: (faults, wrong credentials?, channel overrides) → (status, error code, retryable)
CASES = {
    "success": ({}, False, {}, (DeliveryStatus.accepted, None, False)),
    "auth failure": ({}, True, {}, (DeliveryStatus.failed, "smtp_535", False)),
    "throttled": ({"throttle_rate": 1.0}, False, {}, (DeliveryStatus.failed, "smtp_451", True)),
    "outage": ({"outage": True}, False, {}, (DeliveryStatus.failed, "smtp_421", True)),
    "error": ({"error_rate": 1.0}, False, {}, (DeliveryStatus.failed, "smtp_554", False)),
    "malformed response": ({"malformed_rate": 1.0}, False, {}, (DeliveryStatus.failed, "malformed_response", False)),
    "timeout": ({"latency_ms": 400}, False, {"timeout_s": 0.1}, (DeliveryStatus.failed, "timeout", True)),
}


def smtp_channel(h: ProviderHarness, **options: str) -> dict:
    port = str(h.settings.sandbox_port + 1)
    return {
        "url": None,
        "format": "email",
        "options": {"host": "127.0.0.1", "port": port, "starttls": "false", **options},
    }


@pytest.mark.parametrize("case", CASES)
def test_cases(case: str, tmp_path) -> None:
    faults, forged, channel, (status, code, retryable) = CASES[case]

    async def run():
        async with ProviderHarness("smtp", tmp_path) as h:
            h.box.faults = h.box.faults.model_copy(update=faults)
            credentials = SmtpAdapter.Credentials(password=SecretStr("wrong")) if forged else None
            adapter = h.adapter(credentials, **smtp_channel(h, **{"from": "Shop <news@shop.example>"}), **channel)
            msg = h.message(address="ann@example.org", html="<p>你好</p>", extra=json.dumps({"headers": HEADERS}))
            return await adapter.send(msg), h.box

    result, box = asyncio.run(run())
    assert (result.status, result.error_code, result.retryable) == (status, code, retryable)
    if case == "success":
        assert result.provider_message_id == "<m1@shop.example>"
        [item] = box.received
        body = item.body
        assert body["message_id"] == result.provider_message_id
        assert (body["from"], body["to"], body["subject"]) == (
            "Shop <news@shop.example>",
            "ann@example.org",
            "Flash sale",
        )
        assert body["text"].strip() == "你好 — only 3 left" and body["html"].strip() == "<p>你好</p>"
        assert body["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert body["envelope"] == {"mail_from": "news@shop.example", "rcpt_tos": ["ann@example.org"]}
    if case == "auth failure":
        assert box.rejected >= 1 and not box.received  # one per mechanism the client tries (PLAIN, LOGIN)


def test_connection_is_reused_and_rebuilt_after_a_failure(tmp_path) -> None:
    async def run():
        async with ProviderHarness("smtp", tmp_path) as h:
            adapter = h.adapter(**smtp_channel(h))
            first = await adapter.send(h.message(message_id="a", address="a@example.org"))
            connection = adapter._smtp
            second = await adapter.send(h.message(message_id="b", address="b@example.org"))
            reused = adapter._smtp is connection
            h.box.faults = h.box.faults.model_copy(update={"outage": True})
            down = await adapter.send(h.message(message_id="c", address="c@example.org"))
            h.box.faults = h.box.faults.model_copy(update={"outage": False})
            back = await adapter.send(h.message(message_id="c", address="c@example.org"))
            return [first, second, down, back], reused, [r.body["to"] for r in h.box.received]

    results, reused, arrived = asyncio.run(run())
    assert [r.status for r in results] == [DeliveryStatus.accepted] * 2 + [
        DeliveryStatus.failed,
        DeliveryStatus.accepted,
    ]
    assert reused and arrived == ["a@example.org", "b@example.org", "c@example.org"]
    assert results[3].provider_message_id == "<c@example.com>"


def test_unreachable_relay_is_a_retryable_transport_failure(tmp_path) -> None:
    async def run():
        async with ProviderHarness("smtp", tmp_path) as h:
            channel = smtp_channel(h)
            channel["options"]["port"] = "1"  # nothing listens there
            return await h.adapter(**channel).send(h.message(address="a@example.org"))

    result = asyncio.run(run())
    assert (result.status, result.error_code, result.retryable) == (DeliveryStatus.failed, "transport", True)


@pytest.mark.unit
def test_message_is_stable_and_dkim_friendly() -> None:
    from email.headerregistry import Address

    sender = Address("Brand", "no-reply", "example.com")
    msg = message(address="ann@example.org", html="<b>x</b>", extra=json.dumps({"headers": {**HEADERS, "Bcc": "x"}}))
    one, two = build_email(msg, sender), build_email(msg, sender)
    assert one.as_bytes() == two.as_bytes()  # a retry sends the same bytes: same Date, same Message-ID
    assert one["Bcc"] is None and one["List-Unsubscribe"] == HEADERS["List-Unsubscribe"]
    assert one.get_content_type() == "multipart/alternative"
    assert b"\r\n" in one.as_bytes() and b"\n\n" not in one.as_bytes().replace(b"\r\n", b"")
    assert message_id_header("m 1<>", "example.com") != message_id_header("m 2<>", "example.com")
    assert message_id_header("9f86d081", "example.com") == "<9f86d081@example.com>"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({}, "options\\['host'\\]"),
        ({"host": "h", "from": "not an address"}, "not a mailbox"),
        ({"host": "h", "starttls": "maybe"}, "true/false"),
    ],
)
def test_options_are_validated(options, error) -> None:
    from schemas.config import Channel

    with pytest.raises(ValueError, match=error):
        SmtpAdapter(Channel(id="e", provider="smtp", format="email", options=options), SmtpAdapter.Credentials())


@pytest.mark.unit
def test_default_sender_uses_the_brand() -> None:
    from schemas.config import Channel

    adapter = SmtpAdapter(
        Channel(id="e", provider="smtp", format="email", brand="Acme", options={"host": "h"}), SmtpAdapter.Credentials()
    )
    assert str(adapter.sender) == "Acme <no-reply@example.com>" and adapter.port == 587
