"""Copy generation's pure parts: what check refuses and why, the chat a writer gets, the Template a bundle becomes,
and the offline writer, whose copy must pass the same checks."""

from __future__ import annotations

import asyncio
import json

import pytest

from schemas.config import Campaign, CampaignVariant
from streams.copy.generate import (
    CopyBrief,
    CopyBundle,
    CopyExample,
    bundle_schema,
    check,
    generate,
    generated_variant_ids,
    messages_for,
    parse_bundle,
    to_template,
    with_generated_variants,
)
from streams.copy.offline import OfflineWriter, compose
from streams.copy.variants import BetaPrior

pytestmark = pytest.mark.unit

ZH = {
    "product": {"name": "Loopcast 降噪耳机 Pro", "price": "299", "selling_points": ["40 小时续航", "主动降噪"]},
    "campaign": {"goal": "清库存", "phase": "peak", "offer": "满300减50", "tone": "活泼", "language": "zh"},
    "persona": "25-35 岁通勤白领",
    "fields": ["name", "product_name", "stock"],
    "channels": ["sms-cn", "push-fcm", "push-apns", "email", "wecom"],
    "variants": 3,
}
GOOD = {
    "title": "满300减50｜${product_name}",
    "short_text": "${name}，${product_name}仅剩${stock}件<#if stock < 5>，手慢无</#if>！",
    "long_text": "${name}，你关注的${product_name}正在大促，仅剩${stock}件。",
    "image_prompt": "耳机产品图",
    "image_url": None,
    "cta": "立即抢购",
}


def brief(**changes) -> CopyBrief:
    return CopyBrief.model_validate({**ZH, **changes})


def bundle(**changes) -> CopyBundle:
    return CopyBundle.model_validate({**GOOD, **changes})


def test_good_copy_passes() -> None:
    assert check(bundle(), brief()) == []


# (what is wrong, the change, a phrase the reason must hold)
CASES = [
    ("unclosed if", {"short_text": "${name}${product_name}${stock}<#if stock < 5>快抢"}, "short_text does not compile"),
    ("dropped field", {"short_text": "${name}，${product_name}快抢！"}, "short_text does not use the field ${stock}"),
    (
        "field missing in long text",
        {"long_text": "${name}，${product_name}"},
        "long_text does not use the field ${stock}",
    ),
    ("unknown field", {"cta": "领${coupon}"}, "cta uses the field ${coupon}"),
    ("SMS too long", {"short_text": GOOD["short_text"] + "快来抢购吧" * 40}, "sms-cn: short_text is"),
    ("title too long for APNs", {"title": "超长标题" * 12}, "push-apns: the title is 48 characters"),
    ("push body too long", {"short_text": GOOD["short_text"] + "好" * 120}, "push-apns: short_text is"),
]


@pytest.mark.parametrize(("what", "change", "reason"), CASES, ids=[c[0] for c in CASES])
def test_check_refuses_with_the_reason(what: str, change: dict, reason: str) -> None:
    problems = check(bundle(**change), brief())
    assert any(reason in p for p in problems), problems


def test_compile_errors_carry_line_and_column() -> None:
    [problem] = check(bundle(short_text="${name}${product_name}${stock}\n<#if stock < 5>快抢"), brief())
    assert "line 2, column 1" in problem


def test_sms_problem_gives_measured_length_and_what_fits() -> None:
    long = "快来抢购吧" * 40
    problems = check(bundle(short_text=f"${{name}}${{product_name}}${{stock}}{long}"), brief(channels=["sms-cn"]))
    # 王小红 + the product name (18) + "3" + 200 characters; with the signature, link and opt-out 149 fit in 3 parts.
    assert problems[0].startswith("sms-cn: short_text is 221 characters once rendered; only 149 fit (3 SMS parts")


def test_fields_count_in_either_form_the_language_reads() -> None:
    braces = bundle(short_text="{name}，{product_name}仅剩{stock}件", long_text="{name}{product_name}{stock}")
    assert check(braces, brief()) == []
    # `{ name }` is text, not a field, for the language: the field counts as dropped.
    spaced = bundle(short_text="{ name }，{product_name}仅剩{stock}件")
    assert any("does not use the field ${name}" in p for p in check(spaced, brief()))


def test_both_branches_of_a_condition_must_fit() -> None:
    # stock 3 takes the short branch; stock 50 takes the long one, which is over APNs' 110 characters.
    branchy = bundle(short_text="${name}${product_name}<#if stock gt 10>" + "好" * 100 + "<#else>仅剩${stock}件</#if>")
    assert any("push-apns: short_text is" in p for p in check(branchy, brief()))


def test_a_call_to_action_the_sms_would_drop_is_refused() -> None:
    text = "${name}${product_name}${stock}" + "好" * 120
    problems = check(bundle(short_text=text, cta="立即抢购" * 8), brief(channels=["sms-cn"]))
    assert any("cta does not fit" in p for p in problems), problems


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"title": "x", "short_te', "not valid JSON"),
        ('["a"]', "one JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "long_text"}), "long_text is missing"),
        (json.dumps({**GOOD, "cta": ""}), "cta: String should have at least 1 character"),
    ],
)
def test_parse_bundle_reports_unusable_answers(text: str, reason: str) -> None:
    problems = parse_bundle(text)
    assert isinstance(problems, list) and any(reason in p for p in problems), problems


def test_parse_bundle_reads_json_inside_a_code_fence() -> None:
    assert parse_bundle("```json\n" + json.dumps(GOOD) + "\n```") == bundle()


def test_schema_is_strict_shaped() -> None:
    schema = bundle_schema()
    assert set(schema["required"]) == set(CopyBundle.model_fields) and schema["additionalProperties"] is False


def test_messages_carry_brief_fields_limits_examples_and_problems() -> None:
    examples = [CopyExample(title="爆款", short_text="${name}，最后3件", ctr=0.081, cvr=0.012)]
    first = messages_for(brief(), examples, variant=1)
    system, user = first[0]["content"], first[1]["content"]
    assert "${name}, ${product_name}, ${stock}" in system and "push-apns: title at most 40" in system
    assert "Simplified Chinese" in system and "sms-cn" in system
    assert '"variant": 1' in user and "angle: scarcity" in user and "CTR 8.1%" in user
    retry = messages_for(brief(), examples, ["short_text does not use the field ${stock}"], attempt=2, previous="{}")
    assert [m["role"] for m in retry] == ["system", "user", "assistant", "user"]
    assert "Attempt 2" in retry[-1]["content"] and "does not use the field ${stock}" in retry[-1]["content"]


def test_to_template_maps_the_parts() -> None:
    template = to_template(
        bundle(image_url="https://img.example.com/a.png"), "t-gen-1", link="https://shop.example.com", source="llm:m"
    )
    assert template.source == "llm:m"
    assert (template.title, template.body, template.long_text) == (GOOD["title"], GOOD["short_text"], GOOD["long_text"])
    assert (template.image_url, template.link, template.cta) == (
        "https://img.example.com/a.png",
        "https://shop.example.com",
        "立即抢购",
    )


def test_generated_variants_join_the_hand_written_copy() -> None:
    single = Campaign(id="c1", name="C", trigger={"event_type": "cart"}, channel="sms", template_id="t-hand")
    assert generated_variant_ids(single, 2) == ["gen-2-1", "gen-2-2"]
    prior = BetaPrior(alpha=21, beta=81)
    updated = with_generated_variants(single, ["c1.gen-2-1", "c1.gen-2-2"], {"c1.gen-2-2": prior})
    assert [(v.id, v.template_id, v.prior) for v in updated.variants] == [
        ("a", "t-hand", None),
        ("gen-2-1", "c1.gen-2-1", None),
        ("gen-2-2", "c1.gen-2-2", prior),
    ]
    assert updated.template_id is None and updated.version == 2 and updated.experiment.fallback == "a"
    # A second run replaces the earlier generated variants, under new ids: outcomes of the first generation's
    # sends keep pointing at the first generation's copy.
    again = with_generated_variants(updated, ["c1.gen-3-1"])
    assert [v.id for v in again.variants] == ["a", "gen-3-1"]
    full = single.model_copy(
        update={"template_id": None, "variants": [CampaignVariant(id=f"h{i}", template_id="t") for i in range(4)]}
    )
    with pytest.raises(ValueError, match="2 to 5"):
        with_generated_variants(full, ["x", "y"])


OFFLINE_BRIEFS = [
    ZH,
    {**ZH, "fields": ["name", "product_name", "stock", "lastPurchaseDate"], "channels": ["sms-cn", "push-huawei"]},
    {**ZH, "fields": [], "channels": ["push-xiaomi", "feishu", "dingtalk"], "variants": 5},
    {
        **ZH,
        "campaign": {"goal": "win back", "phase": "long-tail", "offer": "20% off", "tone": "warm", "language": "en"},
        "fields": ["name", "price", "user.vip_level"],
        "channels": ["sms", "push-apns", "telegram", "slack", "email", "inbox", "webhook"],
        "variants": 5,
    },
]


@pytest.mark.parametrize("raw", OFFLINE_BRIEFS)
def test_offline_writer_copy_passes_check(raw: dict) -> None:
    b = CopyBrief.model_validate(raw)
    result = asyncio.run(generate(b, OfflineWriter()))
    assert result.source == "offline" and result.failed == [] and len(result.accepted) == b.variants
    for copy in result.accepted:
        assert check(copy.bundle, b) == []
    assert len({c.bundle.short_text for c in result.accepted}) == b.variants


def test_offline_writer_is_deterministic_and_shortens_on_retry() -> None:
    b = brief()
    assert compose(b, 0) == compose(b, 0)
    assert len(compose(b, 0, level=3).short_text) < len(compose(b, 0).short_text)
