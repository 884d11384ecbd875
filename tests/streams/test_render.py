from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas.config import Channel, Template
from schemas.models import MatchedMessage, OutcomeCode, Priority, RenderedMessage
from streams.links import read_token
from streams.render import RenderSettings, render_message

pytestmark = pytest.mark.unit

SETTINGS = RenderSettings(link_base="http://127.0.0.1:18800", link_secret="s3cret")
CHANNEL = Channel(id="webhook", provider="webhook", url="http://127.0.0.1:1/h")
MESSAGE = MatchedMessage(
    message_id="m1",
    campaign_id="c1",
    user_id="u1",
    event_id="e1",
    event_type="cart_abandoned",
    channel="webhook",
    priority=Priority.normal,
    triggered_at=datetime(2026, 1, 1, tzinfo=UTC),
    properties={"product_name": "Earbuds", "stock": 3},
)


def template(body: str, title: str | None = None, link: str | None = None, version: int = 1) -> Template:
    return Template(id=f"t-{abs(hash((body, title, link)))}", version=version, body=body, title=title, link=link)


# (body template, profile, expected body or the outcome code)
CASES = [
    ("Hi {{ name }}, {{ product_name }} waits", {"name": "Lin"}, "Hi Lin, Earbuds waits"),
    ("{{ user.name }}: only {{ event.stock }} left", {"name": "小红"}, "小红: only 3 left"),
    ("{% if vip_level > 1 %}VIP {% endif %}{{ name }}", {"name": "Sam", "vip_level": 2}, "VIP Sam"),
    ("Hi {{ name }}", {}, OutcomeCode.render_failed),
    ("{{ ''.__class__.__mro__ }}", {}, OutcomeCode.render_failed),
    ("   ", {"name": "x"}, OutcomeCode.render_failed),
    ("{% for x in %}", {}, OutcomeCode.render_failed),
]


@pytest.mark.parametrize(("body", "profile", "expected"), CASES)
def test_render(body, profile, expected) -> None:
    result = render_message(MESSAGE, profile, template(body), CHANNEL, SETTINGS)
    if isinstance(expected, OutcomeCode):
        assert result.code is expected and result.reason
    else:
        assert isinstance(result, RenderedMessage) and result.body == expected


def test_missing_field_is_named() -> None:
    result = render_message(MESSAGE, {}, template("Hi {{ name }}"), CHANNEL, SETTINGS)
    assert "name" in result.reason


def test_no_address_on_channel() -> None:
    channel = CHANNEL.model_copy(update={"address_field": "phone"})
    result = render_message(MESSAGE, {"name": "x"}, template("hi"), channel, SETTINGS)
    assert result.code is OutcomeCode.no_address


def test_link_is_tracked_and_signed() -> None:
    result = render_message(
        MESSAGE, {}, template("b", link="https://shop.example/p/{{ product_name }}"), CHANNEL, SETTINGS
    )
    assert result.link.startswith("http://127.0.0.1:18800/c/")
    claims = read_token("s3cret", result.link.rsplit("/", 1)[1])
    assert (claims.message_id, claims.url) == ("m1", "https://shop.example/p/Earbuds")
    with pytest.raises(ValueError):
        read_token("other-secret", result.link.rsplit("/", 1)[1])


def test_missing_template_or_channel() -> None:
    assert render_message(MESSAGE, {}, None, CHANNEL, SETTINGS).code is OutcomeCode.render_failed
    assert render_message(MESSAGE, {}, template("x"), None, SETTINGS).code is OutcomeCode.render_failed
