from __future__ import annotations

import json

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.copy.channels import (
    RULES,
    AdaptationError,
    Adapted,
    ChannelRules,
    Content,
    adapt,
    measure,
    sms_segments,
    truncate,
)

pytestmark = pytest.mark.unit

LINK = "https://lc.example/t/abc"
IMG = "https://img.example/e.png"
UNSUB = "https://lc.example/u/1"
LONG = "Hi Lin, Earbuds are 20% off today only."
SALE = Content(title="Sale", short_text="Earbuds 20% off", long_text=LONG, image_url=IMG, link=LINK, cta="Shop now")

# (kind, title, body): the same short content on every channel, default locale, brand "Loopcast"
KINDS = [
    ("sms", None, f"Loopcast: {LONG} Shop now: {LINK} Reply STOP to opt out"),
    ("sms-cn", None, f"【Loopcast】{LONG} Shop now：{LINK} 回T退订"),
    ("push-fcm", "Sale", LONG),
    ("push-apns", "Sale", LONG),
    ("push-huawei", "Sale", LONG),
    ("push-xiaomi", "Sale", LONG),
    ("email", "Sale", f"Sale\n\n{LONG}\n\nShop now: {LINK}\n\nLoopcast\n\nUnsubscribe: {UNSUB}"),
    ("wecom", "Sale", f"### Sale\n\n{LONG}\n\n[Shop now]({LINK})"),
    ("dingtalk", "Sale", f"### Sale\n\n![]({IMG})\n\n{LONG}\n\n[Shop now]({LINK})"),
    ("feishu", "Sale", LONG),
    ("slack", "Sale", f"*Sale*\n\n{LONG}\n\n<{LINK}|Shop now>"),
    ("telegram", "Sale", f"*Sale*\n\nHi Lin, Earbuds are 20% off today only\\.\n\n[Shop now]({LINK})"),
    ("webhook", "Sale", LONG),
    ("inbox", "Sale", LONG),
]

# (text, encoding, segments)
SMS = [
    ("", "GSM-7", 1),
    ("a" * 160, "GSM-7", 1),
    ("a" * 161, "GSM-7", 2),
    ("a" * 306, "GSM-7", 2),
    ("a" * 307, "GSM-7", 3),
    ("€" * 80, "GSM-7", 1),  # extension characters cost two septets
    ("€" + "a" * 159, "GSM-7", 2),
    ("[" + "a" * 158, "GSM-7", 1),
    ("[" + "a" * 159, "GSM-7", 2),
    ("a" * 152 + "€" + "a" * 152, "GSM-7", 3),  # 306 septets, but the escape pair cannot straddle parts
    ("Ça coûte 5€\n", "UCS-2", 1),  # û is not GSM-7
    ("ç", "UCS-2", 1),  # only the capital Ç is in the basic set
    ("中" * 70, "UCS-2", 1),
    ("中" * 71, "UCS-2", 2),
    ("中" * 134, "UCS-2", 2),
    ("中" * 135, "UCS-2", 3),
    ("a" * 69 + "中", "UCS-2", 1),
    ("😀" * 35, "UCS-2", 1),  # 70 UTF-16 units
    ("😀" * 36, "UCS-2", 2),
    ("😀" * 67, "UCS-2", 3),  # 134 units, but a surrogate pair cannot straddle parts
]

# (text, max_len, unit, ellipsis, expected)
TRUNCATE = [
    ("hello world", 20, "chars", "…", "hello world"),
    ("hello world", 8, "chars", "…", "hello w…"),
    ("hello world", 7, "chars", "…", "hello…"),  # no dangling space before the ellipsis
    ("hello world", 5, "chars", "...", "he..."),
    ("👩‍👩‍👧‍👦👩‍👩‍👧‍👦", 8, "chars", "…", "👩‍👩‍👧‍👦…"),  # a ZWJ family is 7 code points
    ("👩‍👩‍👧‍👦👩‍👩‍👧‍👦", 7, "chars", "…", "…"),
    ("🇨🇳🇺🇸", 3, "chars", "…", "🇨🇳…"),
    ("👍🏽👍🏽", 3, "chars", "…", "👍🏽…"),
    ("e\u0301e\u0301e\u0301", 4, "chars", "…", "e\u0301…"),
    ("中文内容", 7, "bytes", "…", "中…"),
    ("中文内容", 12, "bytes", "…", "中文内容"),
    ("😀😀", 3, "utf16", "…", "😀…"),
    ("😀😀", 3, "chars", "…", "😀😀"),
    ("abcdef", 2, "bytes", "…", "ab"),  # the ellipsis alone does not fit: cut without it
    ("€€€€", 5, "septets", "...", "€..."),
    ("€€€€", 4, "septets", "...", "..."),
]


@pytest.mark.parametrize(("kind", "title", "body"), KINDS)
def test_every_kind(kind, title, body) -> None:
    adapted = adapt(SALE, kind, brand="Loopcast", unsubscribe_url=UNSUB)
    assert (adapted.kind, adapted.title, adapted.body) == (kind, title, body)
    assert adapted.extra["source"] == "long_text" and adapted.extra["truncated"] is False
    assert adapted.link == LINK
    assert (adapted.image_url == IMG) is RULES[kind].supports_image


def test_rules_cover_every_kind() -> None:
    assert set(RULES) == {kind for kind, _, _ in KINDS}
    assert all(kind == r.kind for kind, r in RULES.items())


@pytest.mark.parametrize(("text", "encoding", "segments"), SMS)
def test_sms_segments(text, encoding, segments) -> None:
    assert sms_segments(text) == (encoding, segments)


@pytest.mark.parametrize(("text", "max_len", "unit", "ellipsis", "expected"), TRUNCATE)
def test_truncate(text, max_len, unit, ellipsis, expected) -> None:
    assert truncate(text, max_len, unit=unit, ellipsis=ellipsis) == expected


# (kind, content, options, what the error names)
MISSING = [
    ("sms", Content(title="Only a title"), {}, "short_text or long_text"),
    ("inbox", Content(short_text="  \n "), {}, "short_text or long_text"),
    ("sms-cn", Content(short_text="你好"), {}, "brand"),
    ("push-xiaomi", Content(short_text="hi"), {}, "title or brand"),
    ("push-huawei", Content(short_text="hi"), {}, "title or brand"),
    ("email", Content(long_text="no subject to take"), {}, "title or short_text"),
    ("email", Content(short_text="hi", link="javascript:alert(1)"), {}, "unsafe"),
    ("wecom", Content(short_text="hi", image_url=" data:text/html,x"), {}, "unsafe"),
    ("slack", Content(short_text="hi", link="\x01java\tscript:alert(1)"), {}, "unsafe"),
    ("email", Content(title="t", short_text="hi"), {"unsubscribe_url": "https://x.example/u>\r\nBcc: a@b"}, "cannot"),
    ("sms", Content(short_text="hi", link="https://x.example/a b"), {}, "cannot"),
]


@pytest.mark.parametrize(("kind", "content", "options", "reason"), MISSING)
def test_missing_parts(kind, content, options, reason) -> None:
    with pytest.raises(AdaptationError, match=reason):
        adapt(content, kind, **options)


@pytest.mark.parametrize("kind", RULES)
def test_no_text_is_an_error_everywhere(kind) -> None:
    with pytest.raises(AdaptationError):
        adapt(Content(title="t", link=LINK), kind, brand="B")


def test_unknown_kind() -> None:
    with pytest.raises(LookupError):
        adapt(SALE, "pager")


def test_brand_fills_a_required_title() -> None:
    adapted = adapt(Content(short_text="hi"), "push-xiaomi", brand="Loopcast")
    assert adapted.title == "Loopcast" and "image_url" not in adapted.extra.get("dropped", [])


# (long text, short text, source used, truncated) on APNs: body 110 chars
FALLBACK = [
    ("L" * 110, "short", "long_text", False),
    ("L" * 111, "short", "short_text", False),
    ("L" * 111, "S" * 111, "short_text", True),
    ("L" * 111, None, "long_text", True),
    (None, "S" * 111, "short_text", True),
]


@pytest.mark.parametrize(("long", "short", "source", "truncated"), FALLBACK)
def test_long_falls_back_to_short(long, short, source, truncated) -> None:
    adapted = adapt(Content(title="t", short_text=short, long_text=long), "push-apns")
    assert (adapted.extra["source"], adapted.extra["truncated"]) == (source, truncated)
    assert len(adapted.body) <= 110 and adapted.body.endswith("…") is truncated


def test_sms_keeps_signature_link_and_suffix() -> None:
    adapted = adapt(Content(long_text="word " * 200, link=LINK), "sms", brand="Loopcast")
    assert adapted.body.startswith("Loopcast: word word")
    assert adapted.body.endswith(f"... {LINK} Reply STOP to opt out")  # GSM-7 ellipsis keeps it GSM-7
    assert adapted.extra | {"encoding": "GSM-7", "segments": 3} == adapted.extra
    assert 459 - 5 <= adapted.extra["units"] <= 459


def test_sms_cn_truncates_text_not_signature() -> None:
    adapted = adapt(Content(long_text="限时优惠，" * 60, link=LINK, cta="立即查看"), "sms-cn", brand="小店")
    assert adapted.body.startswith("【小店】限时优惠") and adapted.body.endswith(f"… {LINK} 回T退订")
    assert (adapted.extra["encoding"], adapted.extra["segments"]) == ("UCS-2", 3)
    assert adapted.extra["dropped"] == ["cta"]  # nothing fit whole beside it


def test_sms_without_brand_has_no_signature() -> None:
    assert adapt(Content(short_text="Hi"), "sms").body == "Hi Reply STOP to opt out"


def test_links_are_trimmed_not_rejected_for_surrounding_space() -> None:
    adapted = adapt(Content(short_text="Hi", link=f" {LINK}\n"), "sms")
    assert adapted.link == LINK and adapted.body == f"Hi {LINK} Reply STOP to opt out"


def test_push_payload_stays_under_4kib() -> None:
    link = "myapp://product/1?" + "x" * 3400
    adapted = adapt(Content(title="t", short_text="中" * 500), "push-fcm")
    assert adapted.extra["payload_bytes"] < 4096 - 512
    big = adapt(Content(title="t", short_text="中" * 240, link=link), "push-fcm")
    assert big.link == link and big.body.endswith("…") and big.extra["payload_bytes"] <= 4096 - 512
    with pytest.raises(AdaptationError, match="no room"):
        adapt(Content(title="t", short_text="hi", link=link, image_url=IMG + "?" + "y" * 500), "push-apns")
    assert adapted.extra["badge"] == 1


def test_email_escapes_and_inlines() -> None:
    content = Content(
        title="<b>Deal</b>\r\nBcc: victim@example.com",
        short_text="Short & sweet",
        long_text="<script>alert(1)</script>\n\nSecond paragraph\nsame one",
        image_url=IMG,
        link=LINK + "?a=1&b=2",
    )
    adapted = adapt(content, "email", brand="Loopcast", unsubscribe_url=UNSUB, locale="zh-CN")
    assert adapted.title == "<b>Deal</b> Bcc: victim@example.com"  # one line: no header injection
    page = adapted.html
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<style" not in page and 'style="' in page  # CSS inlined
    assert "Second paragraph<br>same one" in page and f"{LINK}?a=1&amp;b=2" in page
    assert '<html lang="zh-CN">' in page and "退订" in page
    assert adapted.extra["preheader"] == "Short & sweet" and "Short &amp; sweet</span>" in page
    assert "display: none" in page.split("Short &amp; sweet")[0].rsplit("<span", 1)[1]
    assert adapted.extra["headers"] == {
        "List-Unsubscribe": f"<{UNSUB}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    assert "<script>alert(1)</script>" in adapted.text  # the plain part is plain
    assert "headers" not in adapt(content, "email").extra


# (kind, text, escaped)
ESCAPES = [
    ("wecom", "*bold* _x_ [a](b) `c` <font>", "\\*bold\\* \\_x\\_ \\[a\\](b) \\`c\\` \\<font\\>"),
    (
        "dingtalk",
        "# not a heading\n1. not a list\n- nor this\nprice 1.5",
        "\\# not a heading\n1\\. not a list\n\\- nor this\nprice 1.5",
    ),
    ("slack", "a < b && c > d *ok*", "a &lt; b &amp;&amp; c &gt; d *ok*"),
    ("telegram", "1+1=2. Price: $5 (today)! a_b", "1\\+1\\=2\\. Price: $5 \\(today\\)\\! a\\_b"),
]


@pytest.mark.parametrize(("kind", "text", "escaped"), ESCAPES)
def test_markdown_escaping(kind, text, escaped) -> None:
    assert adapt(Content(short_text=text), kind).body == escaped


def test_link_syntax_per_dialect() -> None:
    content = Content(short_text="x", link="https://e.example/a?b=1&c=(2)|3", cta="Go [now]")
    assert adapt(content, "slack").body.endswith("<https://e.example/a?b=1&amp;c=(2)%7C3|Go [now]>")
    assert adapt(content, "telegram").body.endswith("[Go \\[now\\]](https://e.example/a?b=1&c=(2\\)|3)")
    assert adapt(content, "wecom").body.endswith("[Go \\[now\\]](https://e.example/a?b=1&c=%282%29|3)")


def test_slack_blocks() -> None:
    text = ("lorem ipsum " * 300).strip() + " <end>"
    adapted = adapt(Content(title="T" * 200, long_text=text, image_url=IMG, link=LINK), "slack")
    header, image, *sections, actions = adapted.extra["blocks"]
    assert header["text"]["text"] == "T" * 149 + "…"
    assert image == {"type": "image", "image_url": IMG, "alt_text": adapted.title}
    assert len(sections) == 2 and all(len(s["text"]["text"]) <= 3000 for s in sections)
    assert " ".join(s["text"]["text"] for s in sections) == text.replace("<", "&lt;").replace(">", "&gt;")
    assert actions["elements"][0]["url"] == LINK


def test_telegram_caption_with_image() -> None:
    content = Content(long_text="a" * 2000, short_text="short", image_url=IMG)
    assert adapt(content, "telegram").body == "short"
    assert adapt(content.model_copy(update={"image_url": None}), "telegram").extra["source"] == "long_text"


def test_feishu_card() -> None:
    adapted = adapt(Content(title="标题", short_text="**not md**", link=LINK, image_url=IMG), "feishu")
    card = adapted.extra["card"]
    assert card["header"]["title"] == {"tag": "plain_text", "content": "标题"}
    assert card["elements"][0]["text"] == {"tag": "plain_text", "content": "**not md**"}
    assert card["elements"][1]["actions"][0]["url"] == LINK
    assert adapted.extra["dropped"] == ["image_url"]


def test_webhook_and_inbox_keep_everything() -> None:
    long = "x" * 10_000
    hook = adapt(SALE.model_copy(update={"long_text": long}), "webhook", brand="B", locale="fr")
    assert hook.extra["json"] == {**SALE.model_dump(), "long_text": long, "brand": "B", "locale": "fr"} | {
        "unsubscribe_url": None
    }
    assert adapt(SALE.model_copy(update={"long_text": long}), "inbox").body == long


@pytest.mark.parametrize("kind", ["email", "slack", "dingtalk", "wecom", "feishu", "telegram", "inbox"])
def test_big_limits_truncate_too(kind) -> None:
    # Markup-heavy text grows when escaped: the fit is checked on the rendered result, not the raw text.
    source = "<a & b> 中文 👩‍👩‍👧‍👦 *x* 1. " * 6000
    adapted = adapt(Content(title="t", long_text=source, link=LINK), kind, unsubscribe_url=UNSUB)
    within_limits(adapted, RULES[kind])
    assert adapted.extra["truncated"] and cluster_prefix(adapted.extra["body_text"], source.strip())
    carried = {"email": adapted.html, "feishu": json.dumps(adapted.extra.get("card")), "inbox": adapted.link}
    assert LINK in carried.get(kind, adapted.body)


# --- properties over hostile text -------------------------------------------------------------------------------

ATOMS = [
    "a", "Z", " ", "  ", "\n", "\r\n", ".", "*", "_", "[", "]", "(", ")", "<", ">", "&", "|", "\\", "#", "-", "!",
    "€", "^", "{", "ñ", "ç", "中", "文", "。", "😀", "👍🏽", "👩‍👩‍👧‍👦", "🏳️‍🌈", "🇨🇳", "🇺🇸", "e\u0301",
    "a\u0308\u0301", "\u0600", "\u200d", "\u0301", "\ufe0f", "1. ", "# ",
]  # fmt: skip
piece = st.lists(st.one_of(st.sampled_from(ATOMS), st.text(max_size=3)), max_size=60).map("".join)
# Repeating a random piece reaches the byte limits (20 KB, 40,000 chars) without generating megabytes.
text = st.builds(lambda p, n: p * n, piece, st.integers(1, 2000))
optional = st.one_of(st.none(), text)
contents = st.builds(
    Content,
    title=st.one_of(st.none(), piece),
    short_text=st.one_of(st.none(), piece, text),
    long_text=optional,
    image_url=st.sampled_from([None, IMG]),
    link=st.sampled_from([None, LINK, "myapp://p/1?q=a_b(c)"]),
    cta=st.one_of(st.none(), st.sampled_from(["Shop now", "立即查看", "*go*"])),
).filter(lambda c: any(t and t.strip() for t in (c.short_text, c.long_text)))

ELLIPSES = ("…", "...")


def cluster_prefix(fitted: str, source: str) -> bool:
    """fitted is source itself, or whole clusters from its start followed by an ellipsis."""
    if fitted == source:
        return True
    ellipsis = next((e for e in ELLIPSES if fitted.endswith(e)), None)
    if ellipsis is None:
        return False
    head, joined = fitted[: -len(ellipsis)], ""
    for cluster in regex.findall(r"\X", source):
        if len(joined) >= len(head):
            break
        joined += cluster
    return joined == head and len(head) < len(source)


def within_limits(adapted: Adapted, r: ChannelRules) -> None:
    if r.title_max is not None and adapted.title is not None:
        assert measure(adapted.title, r.unit) <= r.title_max
    limit = r.caption_max if adapted.image_url and r.caption_max else r.body_max
    if limit is not None:
        assert measure(adapted.body, r.unit) <= limit
    if r.max_segments:
        assert sms_segments(adapted.body)[1] <= r.max_segments
    if r.layout == "push":
        assert adapted.extra["payload_bytes"] <= r.payload_max - r.payload_reserve
    if r.layout == "email":
        assert len(adapted.html.encode()) <= r.payload_max
        assert len(adapted.extra["preheader"]) <= r.preheader_max
    if r.layout == "card":
        assert len(json.dumps(adapted.extra["card"], separators=(",", ":"))) <= r.payload_max
    if r.layout == "slack":
        for block in adapted.extra["blocks"]:
            limit = r.section_max if block["type"] == "section" else 150 if block["type"] == "header" else None
            assert limit is None or len(block["text"]["text"]) <= limit


@pytest.mark.parametrize("kind", RULES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(content=contents)
def test_adapted_copy_is_whole_and_within_limits(kind, content) -> None:
    r = RULES[kind]
    try:
        adapted = adapt(content, kind, brand="Loopcast", unsubscribe_url=UNSUB)
    except AdaptationError as exc:
        parts = content.model_dump() | {"brand": "Loopcast"}
        if any(not any((parts[p] or "").strip() for p in group) for group in r.required):
            return
        # Else only a first grapheme too long for the room is a reason to give up (graphemes are never cut).
        assert "no room" in str(exc)
        last = next(getattr(content, p) for p in reversed(r.text_from) if (getattr(content, p) or "").strip())
        assert len(regex.match(r"\X", last.strip())[0]) > 10
        return
    within_limits(adapted, r)
    fitted, source = adapted.extra["body_text"], getattr(content, adapted.extra["source"]).strip()
    assert fitted == source or fitted not in ("", *ELLIPSES)
    assert cluster_prefix(fitted, source)
    if adapted.extra["truncated"]:
        assert fitted != source
    if r.title_max and adapted.title:
        sources = [getattr(content, p) if p != "brand" else "Loopcast" for p in r.title_from]
        title_source = " ".join(next(s for s in sources if s and s.strip()).split())
        assert cluster_prefix(adapted.title, title_source)
    if r.layout == "sms":
        assert adapted.body.startswith("【Loopcast】" if kind == "sms-cn" else "Loopcast: ")
        assert adapted.body.endswith(f" {r.unsubscribe_suffix}")
        assert content.link is None or content.link in adapted.body
    if kind in ("dingtalk", "push-xiaomi", "push-huawei", "email"):
        assert adapted.title


def reference_truncate(text: str, max_len: int, unit: str) -> tuple[str, str]:
    """The longest whole-cluster prefix that fits with the ellipsis, by segmenting everything, and that ellipsis."""
    ellipsis = "…" if measure("…", unit) <= max_len else ""
    kept = ""
    for cluster in regex.findall(r"\X", text):
        if measure(kept + cluster, unit) > max_len - measure(ellipsis, unit):
            break
        kept += cluster
    return kept, ellipsis


@settings(max_examples=200, deadline=None)
@given(text=text, max_len=st.integers(0, 300), unit=st.sampled_from(["chars", "bytes", "utf16", "septets"]))
def test_truncate_properties(text, max_len, unit) -> None:
    cut = truncate(text, max_len, unit=unit)
    assert measure(cut, unit) <= max_len
    if measure(text, unit) <= max_len:
        assert cut == text
        return
    kept, ellipsis = reference_truncate(text, max_len, unit)
    assert cut.endswith(ellipsis) and (not ellipsis or cluster_prefix(cut, text))
    # As long as the reference, less only the spaces it would leave before the ellipsis.
    head = cut[: len(cut) - len(ellipsis)]
    assert kept.startswith(head) and not kept[len(head) :].strip()


def reference_segments(text: str) -> tuple[str, int]:
    """Straight from the spec: greedy packing, escape and surrogate pairs never split."""
    basic = set(
        "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
        "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
    )
    extension = set("\f^{}\\[~]|€")
    if set(text) <= basic | extension:
        costs, single, part, encoding = [2 if c in extension else 1 for c in text], 160, 153, "GSM-7"
    else:
        costs, single, part, encoding = [2 if ord(c) > 0xFFFF else 1 for c in text], 70, 67, "UCS-2"
    if sum(costs) <= single:
        return encoding, 1
    parts, room = 1, part
    for cost in costs:
        if cost > room:
            parts, room = parts + 1, part
        room -= cost
    return encoding, parts


@settings(max_examples=300, deadline=None)
@given(text=text)
def test_sms_segments_match_reference(text) -> None:
    assert sms_segments(text) == reference_segments(text)


def _elements(document: str) -> list[tuple[str, frozenset]]:
    from html.parser import HTMLParser

    found: list[tuple[str, frozenset]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, frozenset(attrs)))

    Collect().feed(document)
    return found


def test_email_styles_match_inlining_per_message() -> None:
    """The precomputed inline styles give what inlining the stylesheet into each message gives."""
    import re as _re

    from streams.copy import channels as ch

    content = Content(
        title="Hi", short_text="short", long_text="a\n\nb", image_url="https://x/i.png", link="https://x/l", cta="Go"
    )
    fast = adapt(content, "email", brand="B", unsubscribe_url="https://x/u").html
    per_message = ch._INLINER.inline(
        _re.sub(r' style="[^"]*"', "", fast).replace("</head>", f"<style>{ch._EMAIL_CSS}</style></head>")
    )
    assert _elements(per_message) == _elements(ch._INLINER.inline(fast))
