from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from schemas.config import Campaign, CampaignVariant, Channel, Template, Trigger
from schemas.models import MatchedMessage, OutcomeCode, Priority, RenderedMessage
from streams.links import read_token
from streams.render import WAIT, RenderSettings, choose_variant, render_message

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


def campaign(**kw) -> Campaign:
    base = {
        "id": "c1",
        "name": "C",
        "trigger": Trigger(event_type="cart_abandoned"),
        "channel": "webhook",
        "template_id": "t",
    }
    return Campaign(**{**base, **kw})


def template(body: str, title: str | None = None, link: str | None = None, version: int = 1) -> Template:
    return Template(id=f"t-{abs(hash((body, title, link)))}", version=version, body=body, title=title, link=link)


# (body template, profile, expected body or the outcome code)
CASES = [
    ("Hi {{ name }}, {{ product_name }} waits", {"name": "Lin"}, "Hi Lin, Earbuds waits"),
    ("${user.name}: only ${event.stock} left", {"name": "小红"}, "小红: only 3 left"),
    ("<#if vip_level > 1>VIP </#if>{name}", {"name": "Sam", "vip_level": 2}, "VIP Sam"),
    ('Hi ${name!"friend"}', {}, "Hi friend"),
    ("Hi ${name}", {}, OutcomeCode.render_failed),
    ("{{ ''.__class__.__mro__ }}", {}, OutcomeCode.render_failed),
]


@pytest.mark.parametrize(("body", "profile", "expected"), CASES)
def test_render(body, profile, expected) -> None:
    result = render_message(MESSAGE, profile, campaign(), template(body), CHANNEL, SETTINGS)
    if isinstance(expected, OutcomeCode):
        assert result.code is expected and result.reason
    else:
        assert isinstance(result, RenderedMessage) and result.body == expected


@pytest.mark.parametrize(("policy", "expected"), [("use_default", "Hi friend"), ("suppress", None)])
def test_missing_field_policy(policy, expected) -> None:
    c = campaign(missing_fields=policy, field_defaults={"name": "friend"})
    result = render_message(MESSAGE, {}, c, template("Hi ${name}"), CHANNEL, SETTINGS)
    if expected:
        assert result.body == expected
    else:
        assert result.code is OutcomeCode.render_failed and result.reason == "missing field: name"


def test_authoring_errors_are_refused_at_save_time() -> None:
    with pytest.raises(ValueError, match=r"body: line 2, column"):
        Template(id="bad", body="Hello\n<#if age > 30>unclosed")


def test_no_address_on_channel() -> None:
    channel = CHANNEL.model_copy(update={"address_field": "phone"})
    result = render_message(MESSAGE, {"name": "x"}, campaign(), template("hi"), channel, SETTINGS)
    assert result.code is OutcomeCode.no_address


def test_link_is_tracked_and_signed() -> None:
    result = render_message(
        MESSAGE, {}, campaign(), template("b", link="https://shop.example/p/{{ product_name }}"), CHANNEL, SETTINGS
    )
    assert result.link.startswith("http://127.0.0.1:18800/c/")
    claims = read_token("s3cret", result.link.rsplit("/", 1)[1])
    assert (claims.message_id, claims.url) == ("m1", "https://shop.example/p/Earbuds")
    with pytest.raises(ValueError):
        read_token("other-secret", result.link.rsplit("/", 1)[1])


def test_content_is_adapted_to_the_channel_format() -> None:
    sms = Channel(id="sms", provider="webhook", url="http://127.0.0.1:1/h", format="sms-cn", brand="Loopcast")
    result = render_message(
        MESSAGE, {"name": "小红"}, campaign(), template("${name}，${product_name}还在购物车里"), sms, SETTINGS
    )
    assert result.body.startswith("【Loopcast】") and "退订" in result.body
    assert json.loads(result.extra)["encoding"] == "UCS-2"


def test_missing_campaign_template_or_channel() -> None:
    assert render_message(MESSAGE, {}, None, template("x"), CHANNEL, SETTINGS).code is OutcomeCode.render_failed
    assert render_message(MESSAGE, {}, campaign(), None, CHANNEL, SETTINGS).code is OutcomeCode.render_failed
    assert render_message(MESSAGE, {}, campaign(), template("x"), None, SETTINGS).code is OutcomeCode.render_failed


def test_variants_are_stable_and_waiting_users_wait() -> None:
    c = campaign(
        template_id=None,
        variants=[CampaignVariant(id="a", template_id="ta"), CampaignVariant(id="b", template_id="tb")],
    )
    chosen = [choose_variant(c, f"u{i}", None) for i in range(2000)]
    assert chosen == [choose_variant(c, f"u{i}", None) for i in range(2000)]
    # Default experiment: test-then-winner with a 20% test share split evenly; the rest wait.
    assert 0.15 < (chosen.count("a") + chosen.count("b")) / 2000 < 0.25 and chosen.count(WAIT) > 1400
    after = [choose_variant(c, f"u{i}", {"status": "winner", "winner": "b"}) for i in range(2000)]
    assert WAIT not in after and [a for a, b in zip(chosen, after, strict=False) if b != "b"] == [
        x for x in chosen if x == "a"
    ]


def test_sms_links_are_short_codes() -> None:
    from streams.render import ShortLinks

    sms = Channel(id="sms", provider="webhook", url="http://127.0.0.1:1/h", format="sms", brand="Shop")
    links = ShortLinks()
    result = render_message(
        MESSAGE, {}, campaign(), template("Back in stock", link="https://shop.example/x"), sms, SETTINGS, links
    )
    [(code, claims)] = links.issued
    assert len(code) == 10 and f"http://127.0.0.1:18800/s/{code}" in result.body
    assert json.loads(claims)["url"] == "https://shop.example/x"
    # Other channels keep the signed, stateless link.
    other = render_message(
        MESSAGE, {}, campaign(), template("x", link="https://shop.example/x"), CHANNEL, SETTINGS, links
    )
    assert "/c/" in other.link and len(links.issued) == 1


def test_the_channels_providers_tighten_the_formats_limits() -> None:
    from streams.copy.channels import RULES, Content, adapt, measure
    from streams.render import provider_max

    app = Channel(id="wecom-app-ch", provider="wecom-app", format="wecom")
    bot = Channel(id="wecom-bot-ch", provider="wecom-bot", format="wecom")
    assert provider_max(app)[1] == 2048 and RULES["wecom"].body_max == 4096
    long = Content(title="Sale", short_text="好" * 3000)
    via_app = adapt(long, "wecom", provider_max=provider_max(app))
    via_bot = adapt(long, "wecom", provider_max=provider_max(bot))
    assert measure(via_app.body, "bytes") <= 2048 < measure(via_bot.body, "bytes") <= 4096
