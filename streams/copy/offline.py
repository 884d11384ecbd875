"""The offline copy writer: deterministic copy from the brief out of phrase tables (Chinese and English), used when
no LLM endpoint is configured. Its results say source = "offline"; the LLM sandbox writes its good copy with it too.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from streams.copy.generate import CopyBrief, CopyBundle, angle

PHRASES: dict[str, dict[str, dict[str, str] | list[str]]] = {
    "zh": {
        "phase": {"warm-up": "预热开启", "peak": "大促进行中", "long-tail": "返场最后机会"},
        "angle": {
            "benefit": "{point}",
            "scarcity": "库存告急",
            "price": "到手仅{price}元",
            "social proof": "上万人已入手",
            "urgency": "今晚截止",
        },
        "tag": {"benefit": "好物", "scarcity": "限量", "price": "特价", "social proof": "热卖", "urgency": "速抢"},
        "cta": ["立即抢购", "马上查看", "领券下单", "去看看", "立即购买"],
        "more": ["更多惊喜等你发现。", "点击下方按钮，立即下单。", "错过再等一年。"],
    },
    "en": {
        "phase": {"warm-up": "Early access", "peak": "The sale is on", "long-tail": "Last chance"},
        "angle": {
            "benefit": "{point}",
            "scarcity": "Almost gone",
            "price": "now just {price}",
            "social proof": "Loved by thousands",
            "urgency": "Ends tonight",
        },
        "tag": {"benefit": "New", "scarcity": "Rare", "price": "Deal", "social proof": "Hot", "urgency": "Now"},
        "cta": ["Shop now", "See the deal", "Get yours", "Claim the offer", "Buy now"],
        "more": ["More surprises inside.", "Tap the button below to order.", "Don't miss out."],
    },
}
# How far a retry shortens: 0 the full copy, 1 without the phase, 2 without the angle, 3 the fields alone.
LEVELS = 4


def _literal(text: str) -> str:
    """Brief text put into a template as text: braces and `<#` would read as template syntax."""
    return text.replace("{", "(").replace("}", ")").replace("<#", "< #").replace("</#", "</ #").strip()


def _field_phrases(brief: CopyBrief, zh: bool, terse: bool) -> tuple[str, str, list[str]]:
    """(salutation, product reference, phrases for the other fields), each keeping its field."""
    salutation, product, rest = "", _literal(brief.product.name), []
    for path in brief.fields:
        leaf = path.rsplit(".", 1)[-1]
        ref = f"${{{path}}}"
        if leaf == "name":
            salutation = f"{ref}，" if zh else f"{ref}, "
        elif leaf == "product_name":
            product = ref
        elif leaf == "stock":
            cond = "" if terse else f"<#if {path} < 5>{'，手慢无' if zh else ' - hurry'}</#if>"
            rest.append((f"仅剩{ref}件" if zh else f"only {ref} left") + cond)
        elif leaf == "price":
            rest.append(f"到手价{ref}元" if zh else f"now {ref}")
        elif "date" in leaf.lower():
            # The brace form, as operators write dates: the copy language reads both.
            rest.append(f"上次下单{{{path}}}" if zh else f"last order {{{path}}}")
        else:
            rest.append(f"（{ref}）" if zh else f"({ref})")
    return salutation, product, rest


def compose(brief: CopyBrief, variant: int, level: int = 0, rng: random.Random | None = None) -> CopyBundle:
    """One variant's copy; a higher level is shorter. The same brief, variant, level and rng give the same copy."""
    rng = rng or random.Random(f"{brief.model_dump_json()}:{variant}")
    zh = brief.campaign.language == "zh"
    table = PHRASES[brief.campaign.language]
    sep, stop = ("，", "。") if zh else (", ", ". ")
    offer = _literal(brief.campaign.offer or "")
    points = [_literal(p) for p in brief.product.selling_points if p.strip()]
    point = points[variant % len(points)] if points else ""
    price = _literal(brief.product.price or "")
    hook = table["angle"][angle(variant)]
    if ("{point}" in hook and not point) or ("{price}" in hook and not price):
        hook = table["angle"]["urgency"]
    hook = hook.format(point=point, price=price)
    phase = table["phase"][brief.campaign.phase]
    salutation, product, rest = _field_phrases(brief, zh, terse=level >= LEVELS - 1)
    offered = f"{product}{offer}" if zh else f"{product} {offer}".strip()
    if level <= 0:
        body = [f"{phase}：{offered}" if zh else f"{phase}: {offered}", hook, *rest]
    elif level == 1:
        body = [offered, hook, *rest]
    elif level == 2:
        body = [product, *rest]
    else:
        # One word of the angle keeps the variants apart when nothing else is left.
        body = [table["tag"][angle(variant)], product if product.startswith("$") else "", *rest]
    short_text = salutation + sep.join(b for b in body if b) + ("！" if zh else "!")
    long_parts = [salutation + (f"{phase}，{offered}。" if zh else f"{phase}: {offered}.")]
    long_parts += [p + ("。" if zh else ".") for p in points[: 3 - min(level, 2)]]
    if rest:
        long_parts.append(sep.join(rest) + ("。" if zh else "."))
    long_parts.append(rng.choice(table["more"]))
    long_text = ("" if zh else " ").join(long_parts)
    title_bits = [hook, _literal(brief.product.name)] if level < 2 else [hook]
    title = ("｜" if zh else " | ").join(b for b in title_bits if b)[: 40 if level < 2 else 24].strip()
    return CopyBundle(
        title=title,
        short_text=short_text,
        long_text=long_text.strip(),
        image_prompt=(f"Product photo of {brief.product.name}, {brief.campaign.tone} mood, for: {brief.persona}"),
        image_url=brief.image_url,
        cta=table["cta"][(variant + rng.randrange(2)) % len(table["cta"])],
    )


class OfflineWriter:
    """The Writer used without an endpoint: each retry is one level shorter, which is what the checks ask for."""

    source = "offline"

    async def write(
        self,
        brief: CopyBrief,
        messages: list[dict[str, str]],
        *,
        variant: int,
        attempt: int,
        on_delta: Callable[[int], None] | None = None,
    ) -> str:
        level = min(attempt - 1, LEVELS - 1)
        text = json.dumps(compose(brief, variant, level).model_dump(), ensure_ascii=False)
        if on_delta is not None:
            on_delta(len(text))
        return text

    async def close(self) -> None:
        return None
