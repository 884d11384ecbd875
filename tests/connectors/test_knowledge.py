"""The knowledge base in chDB: the live views over outcomes and copy_library, few-shot examples filtered by
format and trigger event, priors from a template's record or from similar copy (the job's terms, or before it
ran the live ranking's), and insights from the job's table or, before it ran, from the live views."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from connectors.knowledge import examples_for, few_shot_examples, insights, prior_for, record_copy, top_rows
from schemas.config import Campaign, Channel, Template
from streams.copy.generate import CopyExample
from streams.copy.knowledge import wilson_lower

pytestmark = pytest.mark.integration

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


def _documents(tag: str) -> list:
    """Two campaigns: an SMS cart reminder with two variants, a push welcome with one template."""
    sms = Channel(id=f"{tag}-sms", provider="webhook", format="sms-cn")
    push = Channel(id=f"{tag}-push", provider="webhook", format="push-fcm")
    templates = [
        Template(id=f"{tag}-strong", body="${name}，购物车里的宝贝只剩3件，快抢", source="llm:test-model"),
        Template(id=f"{tag}-weak", body="${name}，购物车里的宝贝在等你"),
        Template(id=f"{tag}-welcome", title="Welcome aboard", body="Hi ${name}, welcome aboard"),
    ]
    cart = Campaign(
        id=f"{tag}-cart", name="cart", trigger={"event_type": "cart_add"}, channel=sms.id,
        variants=[{"id": "a", "template_id": templates[0].id}, {"id": "b", "template_id": templates[1].id}],
    )  # fmt: skip
    welcome = Campaign(
        id=f"{tag}-welcome", name="w", trigger={"event_type": "signup"}, channel=push.id, template_id=templates[2].id
    )
    return [sms, push, *templates, cart, welcome]


def _outcomes(campaign: str, variant: str | None, channel: str, sends: int, clicks: int, conversions: int) -> list:
    rows = []
    for i in range(sends):
        base = {"message_id": f"{campaign}-{variant}-{i}", "campaign_id": campaign, "user_id": f"u{i}",
                "channel": channel, "stage": "dispatch", "triggered_at": NOW, "occurred_at": NOW}  # fmt: skip
        rows.append({**base, "code": "sent", "variant": variant})
        if i < clicks:
            rows.append({**base, "code": "clicked", "stage": "tracking", "variant": None})
        if i < conversions:
            rows.append({**base, "code": "converted", "stage": "tracking", "variant": None})
    return rows


@pytest.fixture(scope="module")
def tag(warehouse) -> str:
    tag = f"kb{uuid.uuid4().hex[:6]}"
    documents = _documents(tag)
    assert record_copy(warehouse, documents, seen_at=NOW) == 3
    assert record_copy(warehouse, documents, seen_at=NOW + dt.timedelta(minutes=1)) == 3  # a repeat collapses
    rows = (
        _outcomes(f"{tag}-cart", "a", f"{tag}-sms", 400, 80, 20)
        + _outcomes(f"{tag}-cart", "b", f"{tag}-sms", 400, 20, 4)
        + _outcomes(f"{tag}-welcome", None, f"{tag}-push", 100, 10, 1)
        + _outcomes(f"{tag}-cart", "zz", f"{tag}-sms", 50, 50, 50)  # no copy known for it
    )
    warehouse.insert("outcomes", rows)
    return tag


def test_copy_performance_view(warehouse, tag: str) -> None:
    rows = warehouse.query(
        "SELECT variant, template_id, source, sends, clicks, conversions, ctr, ctr_lower, cvr_lower"
        " FROM copy_performance WHERE campaign_id = {c:String} ORDER BY variant",
        {"c": f"{tag}-cart"},
    )
    assert [(r["variant"], r["template_id"], r["sends"], r["clicks"], r["conversions"]) for r in rows] == [
        ("a", f"{tag}-strong", 400, 80, 20),
        ("b", f"{tag}-weak", 400, 20, 4),
        ("zz", "", 50, 50, 50),  # ranked by campaign and variant even before its copy is known
    ]
    assert rows[0]["source"] == "llm:test-model" and rows[1]["source"] == "human"
    assert rows[0]["ctr"] == pytest.approx(0.2)
    assert rows[0]["ctr_lower"] == pytest.approx(wilson_lower(80, 400), abs=1e-12)
    assert rows[1]["cvr_lower"] == pytest.approx(wilson_lower(4, 400), abs=1e-12)


def test_template_ranking_view(warehouse, tag: str) -> None:
    rows = warehouse.query(
        "SELECT template_id, channel, sends, clicks, ctr_lower FROM copy_template_ranking"
        " WHERE startsWith(template_id, {t:String}) ORDER BY ctr_lower DESC, channel",
        {"t": tag},
    )
    assert [(r["template_id"], r["channel"], r["sends"]) for r in rows] == [
        (f"{tag}-strong", "", 400),
        (f"{tag}-strong", f"{tag}-sms", 400),
        (f"{tag}-welcome", "", 100),
        (f"{tag}-welcome", f"{tag}-push", 100),
        (f"{tag}-weak", "", 400),
        (f"{tag}-weak", f"{tag}-sms", 400),
    ]


def test_few_shot_examples(warehouse, tag: str) -> None:
    examples = [e for e in few_shot_examples(warehouse, limit=50) if e["template_id"].startswith(tag)]
    assert [e["template_id"] for e in examples] == [f"{tag}-strong", f"{tag}-welcome", f"{tag}-weak"]
    best = examples[0]
    assert best["short_text"] == "${name}，购物车里的宝贝只剩3件，快抢" and best["trigger_event"] == "cart_add"
    assert CopyExample.model_validate(best).ctr == pytest.approx(0.2)  # what the generator's prompt takes
    sms = few_shot_examples(warehouse, channel_format="sms-cn", trigger_event="cart_add", limit=50)
    assert {e["template_id"] for e in sms if e["template_id"].startswith(tag)} == {f"{tag}-strong", f"{tag}-weak"}
    by_cvr = few_shot_examples(warehouse, channel_format="push-fcm", metric="cvr", limit=50)
    assert f"{tag}-welcome" in [e["template_id"] for e in by_cvr]
    assert few_shot_examples(warehouse, trigger_event="no-such-event") == []
    assert all(e["sends"] >= 30 for e in few_shot_examples(warehouse, limit=50))


def test_examples_for_the_generator(warehouse, tag: str) -> None:
    on_cart = examples_for(warehouse, trigger_event="cart_add", limit=50)
    mine = [e.short_text for e in on_cart if e.short_text.endswith(("快抢", "在等你"))]
    assert mine[:2] == ["${name}，购物车里的宝贝只剩3件，快抢", "${name}，购物车里的宝贝在等你"]
    assert "Hi ${name}, welcome aboard" not in [e.short_text for e in on_cart]
    # Nothing sent on that moment yet: the best copy of any campaign.
    anywhere = examples_for(warehouse, trigger_event="no-such-event", limit=50)
    assert anywhere and anywhere == examples_for(warehouse, limit=50)


def test_prior_for_a_sent_template_uses_its_record(warehouse, tag: str) -> None:
    warehouse.command("TRUNCATE TABLE copy_knowledge")  # the live ranking then answers
    prior = prior_for(warehouse, template_id=f"{tag}-strong")
    assert prior.alpha + prior.beta == pytest.approx(102)  # capped at 100 pseudo-sends
    assert (prior.alpha - 1) / 100 == pytest.approx(0.2)
    cvr = prior_for(warehouse, template_id=f"{tag}-strong", metric="cvr", cap=400)
    assert (cvr.alpha, cvr.beta) == pytest.approx((21, 381))
    flat = prior_for(warehouse, template_id="never-sent")
    assert (flat.alpha, flat.beta) == (1, 1)


def test_prior_for_new_copy_from_similar_terms(warehouse, tag: str) -> None:
    warehouse.command("TRUNCATE TABLE copy_knowledge")
    rows = [
        {"kind": "keyword", "item": "快抢", "campaign_id": "", "channel": "", "templates": 1, "sends": 400,
         "clicks": 80, "conversions": 20, "ctr": 0.2, "cvr": 0.05, "ctr_lower": 0.16, "cvr_lower": 0.03,
         "updated_at": NOW},
        {"kind": "phrase", "item": "购物车", "campaign_id": "", "channel": "", "templates": 2, "sends": 800,
         "clicks": 100, "conversions": 24, "ctr": 0.125, "cvr": 0.03, "ctr_lower": 0.1, "cvr_lower": 0.02,
         "updated_at": NOW},
    ]  # fmt: skip
    warehouse.insert("copy_knowledge", rows)
    prior = prior_for(warehouse, parts={"body": "${name}，快抢购物车里的好物"})
    # Pooled over the matched terms (180 clicks / 1,200 sends), worth the cap of 100 sends.
    assert (prior.alpha, prior.beta) == pytest.approx((1 + 15, 1 + 85))
    nothing = prior_for(warehouse, text="completely unrelated words")
    assert (nothing.alpha, nothing.beta) == (1, 1)
    warehouse.command("TRUNCATE TABLE copy_knowledge")


def test_prior_for_new_copy_before_the_job_ran(warehouse, tag: str) -> None:
    warehouse.command("TRUNCATE TABLE copy_knowledge")
    # "快抢" is only in the strong copy (80 clicks of 400 sends), on this tag's SMS channel.
    prior = prior_for(warehouse, text="快抢", channel=f"{tag}-sms")
    assert (prior.alpha, prior.beta) == pytest.approx((1 + 20, 1 + 80))
    # "购物车" is in both cart templates: 100 clicks of 800 sends, worth the cap.
    shared = prior_for(warehouse, parts={"body": "${name}，购物车"}, channel=f"{tag}-sms")
    assert (shared.alpha, shared.beta) == pytest.approx((1 + 12.5, 1 + 87.5))
    assert prior_for(warehouse, text="快抢", channel=f"{tag}-push") == prior_for(warehouse, text="nothing like it")


def test_insights_before_and_after_the_job(warehouse, tag: str) -> None:
    warehouse.command("TRUNCATE TABLE copy_knowledge")
    live = insights(warehouse, kind="template", campaign_id=f"{tag}-cart")
    assert live.origin == "live views" and "has not run" in live.note
    assert [r["item"] for r in live.rows] == [f"{tag}-strong", f"{tag}-weak"]
    assert live.rows[0]["body"].startswith("${name}")
    assert insights(warehouse, kind="keyword").rows == []
    assert "jobs run knowledge" in insights(warehouse, kind="phrase").note

    job_rows = [
        {"kind": "template", "item": f"{tag}-weak", "campaign_id": "", "channel": "", "templates": 1, "sends": 400,
         "clicks": 20, "conversions": 4, "ctr": 0.05, "cvr": 0.01, "ctr_lower": 0.03, "cvr_lower": 0.004},
        {"kind": "template", "item": f"{tag}-strong", "campaign_id": "", "channel": "", "templates": 1, "sends": 400,
         "clicks": 80, "conversions": 20, "ctr": 0.2, "cvr": 0.05, "ctr_lower": 0.16, "cvr_lower": 0.03},
        {"kind": "keyword", "item": "快抢", "campaign_id": "", "channel": "", "templates": 1, "sends": 400,
         "clicks": 80, "conversions": 20, "ctr": 0.2, "cvr": 0.05, "ctr_lower": 0.16, "cvr_lower": 0.03},
    ]  # fmt: skip
    warehouse.insert("copy_knowledge", [{**r, "updated_at": NOW} for r in job_rows])
    loaded = insights(warehouse, kind="template")
    assert loaded.origin == "copy_knowledge" and loaded.updated_at == NOW
    assert [r["item"] for r in loaded.rows] == [f"{tag}-strong", f"{tag}-weak"]
    assert loaded.rows[0]["body"] == "${name}，购物车里的宝贝只剩3件，快抢"
    top = top_rows(warehouse, limit=1)
    assert [r["item"] for r in top["keyword"].rows] == ["快抢"] and top["phrase"].rows == []
    with pytest.raises(ValueError, match="kind"):
        insights(warehouse, kind="emoji")  # type: ignore[arg-type]
    warehouse.command("TRUNCATE TABLE copy_knowledge")
