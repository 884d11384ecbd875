"""Channel copy: adapt a campaign's one rendered, channel-neutral content to each channel kind's format and limits.

The limits are data (RULES, one entry per kind, each citing its source); a handful of layouts read them, so a new
kind that looks like an existing one is a new RULES entry, not new code.
"""

from __future__ import annotations

import html
import json
import re
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import css_inline
import regex
from pydantic import BaseModel, ConfigDict, Field

Unit = Literal["chars", "bytes", "utf16", "septets"]
Part = Literal["title", "short_text", "long_text", "image_url", "link", "cta", "brand"]
Layout = Literal["sms", "push", "email", "markdown", "slack", "card", "json", "inbox"]


class AdaptationError(ValueError):
    """The content cannot go on this channel: a required part is missing, a URL is unsafe, or the fixed parts
    (title, link, signature…) leave no room for the text."""


class Content(BaseModel):
    """One campaign's copy, already rendered from its templates; plain text, not markup."""

    title: str | None = None
    short_text: str | None = None
    long_text: str | None = None
    image_url: str | None = None
    link: str | None = None
    cta: str | None = None


class ChannelRules(BaseModel):
    """What one channel kind accepts. title_max and body_max count in `unit`; payload_max is always bytes."""

    model_config = ConfigDict(frozen=True)

    kind: str
    format: Literal["text", "markdown", "html", "json", "card"]
    layout: Layout
    unit: Unit = "chars"
    title_max: int | None = None
    body_max: int | None = None
    caption_max: int | None = None  # body limit when an image rides along (a photo caption)
    section_max: int | None = None  # one block of a block-structured message (Slack section)
    payload_max: int | None = None  # the serialized message: push JSON, card JSON, email HTML
    payload_reserve: int = 0  # bytes left for the provider's envelope around our parts
    max_segments: int | None = None
    signature: str | None = None  # "{brand}" template, prefixed to the text
    unsubscribe_suffix: str | None = None
    preheader_max: int | None = None
    title_from: tuple[Part, ...] = ("title",)  # first present part becomes the title
    text_from: tuple[Part, ...] = ("long_text", "short_text")  # first that fits wins; the last is truncated
    required: tuple[tuple[Part, ...], ...] = (("short_text", "long_text"),)  # each group: at least one present
    supports_title: bool = True
    supports_image: bool = False
    badge: int | None = None
    dialect: Literal["commonmark", "slack", "telegram"] | None = None
    locale: str = "en"  # labels ("Open", "Unsubscribe") when the caller gives none
    ellipsis: str = "…"


_TEXT = (("short_text", "long_text"),)
_PUSH_PAYLOAD = 4096  # FCM, APNs (non-VoIP), Huawei and Xiaomi all cap the notification payload at 4 KiB
_PUSH_RESERVE = 512  # vendor envelope keys (aps, android, click_action…) wrapped around our fields

RULES: dict[str, ChannelRules] = {
    rules.kind: rules
    for rules in (
        # GSM 03.38: one part 160 septets / 70 UCS-2 units; concatenated parts lose 7 septets to the UDH (153/67).
        # Three parts is the usual marketing ceiling: cost grows per part and long SMS reassembly is unreliable.
        ChannelRules(
            kind="sms",
            format="text",
            layout="sms",
            max_segments=3,
            signature="{brand}: ",
            unsubscribe_suffix="Reply STOP to opt out",
            supports_title=False,
        ),
        # Chinese carriers require the 【signature】 and an opt-out; 【】 are not GSM-7, so it is always UCS-2 (70/67).
        ChannelRules(
            kind="sms-cn",
            format="text",
            layout="sms",
            max_segments=3,
            signature="【{brand}】",
            unsubscribe_suffix="回T退订",
            required=(*_TEXT, ("brand",)),
            supports_title=False,
            locale="zh",
        ),
        # FCM caps only the payload (4096 bytes); 65/240 chars is what Android shows before ellipsizing.
        ChannelRules(
            kind="push-fcm",
            format="text",
            layout="push",
            title_max=65,
            body_max=240,
            payload_max=_PUSH_PAYLOAD,
            payload_reserve=_PUSH_RESERVE,
            supports_image=True,
            badge=1,
        ),
        # APNs: 4 KB payload; iOS shows about 40 chars of title and 110 of body on the lock screen.
        ChannelRules(
            kind="push-apns",
            format="text",
            layout="push",
            title_max=40,
            body_max=110,
            payload_max=_PUSH_PAYLOAD,
            payload_reserve=_PUSH_RESERVE,
            supports_image=True,  # through a notification service extension (mutable-content)
            badge=1,
        ),
        # Huawei rejects (not truncates) over-long copy: title 40 chars; body 80 per Tencent TPNS (Alibaba mPaaS
        # lists 1024) - the smaller is the one known not to fail. Title and body must not be empty.
        ChannelRules(
            kind="push-huawei",
            format="text",
            layout="push",
            title_max=40,
            body_max=80,
            payload_max=_PUSH_PAYLOAD,
            payload_reserve=_PUSH_RESERVE,
            title_from=("title", "brand"),
            required=(*_TEXT, ("title", "brand")),
            supports_image=True,
            badge=1,
            locale="zh",
        ),
        # Xiaomi: title "长度小于50", description "长度小于128", both required; big pictures need an upload first.
        ChannelRules(
            kind="push-xiaomi",
            format="text",
            layout="push",
            title_max=49,
            body_max=127,
            payload_max=_PUSH_PAYLOAD,
            payload_reserve=_PUSH_RESERVE,
            title_from=("title", "brand"),
            required=(*_TEXT, ("title", "brand")),
            locale="zh",
        ),
        # Subject: RFC 5322 lines stop at 998 chars and clients show 40-90, so 150 guards rather than styles.
        # Gmail clips HTML over 102 KB, hiding the rest (and the unsubscribe footer).
        ChannelRules(
            kind="email",
            format="html",
            layout="email",
            title_max=150,
            payload_max=102_000,
            preheader_max=100,
            title_from=("title", "short_text"),
            required=(*_TEXT, ("title", "short_text")),
            supports_image=True,
        ),
        # WeCom group robot: markdown content at most 4096 bytes of UTF-8; its markdown has no images.
        ChannelRules(
            kind="wecom",
            format="markdown",
            layout="markdown",
            unit="bytes",
            title_max=256,
            body_max=4096,
            dialect="commonmark",
            locale="zh",
        ),
        # DingTalk custom robot: 20000 bytes; markdown needs a title (shown in the chat list, not the message).
        ChannelRules(
            kind="dingtalk",
            format="markdown",
            layout="markdown",
            unit="bytes",
            title_max=256,
            body_max=20_000,
            title_from=("title", "short_text", "long_text"),
            supports_image=True,
            dialect="commonmark",
            locale="zh",
        ),
        # Feishu: an interactive card's JSON may be 30 KB (a custom-bot webhook request is capped at 20 KB);
        # card images need an uploaded image_key, not a URL.
        ChannelRules(
            kind="feishu",
            format="card",
            layout="card",
            title_max=256,
            payload_max=30_000,
            locale="zh",
        ),
        # Slack: `text` is truncated past 40,000 chars; section text 3000; header block plain_text 150.
        ChannelRules(
            kind="slack",
            format="markdown",
            layout="slack",
            title_max=150,
            body_max=40_000,
            section_max=3000,
            supports_image=True,
            dialect="slack",
        ),
        # Telegram: message text 4096 and photo caption 1024; counted here in UTF-16 units, as its entity offsets
        # are, which is never fewer than characters.
        ChannelRules(
            kind="telegram",
            format="markdown",
            layout="markdown",
            unit="utf16",
            title_max=256,
            body_max=4096,
            caption_max=1024,
            supports_image=True,
            dialect="telegram",
        ),
        # The receiver gets every part as JSON; nothing to truncate.
        ChannelRules(kind="webhook", format="json", layout="json", supports_image=True),
        # In-app inbox: our own store and UI; the limits only stop a runaway template.
        ChannelRules(
            kind="inbox",
            format="text",
            layout="inbox",
            title_max=200,
            body_max=20_000,
            title_from=("title", "short_text"),
            supports_image=True,
        ),
    )
}


class Adapted(BaseModel):
    """One channel's message. extra always has source (the content part in body), truncated and body_text
    (that part as fitted, plain); per layout: sms encoding/segments/units, push badge/payload_bytes, email
    preheader/headers, slack blocks, telegram parse_mode, card card, json json; dropped lists parts the channel
    cannot carry."""

    kind: str
    title: str | None = None
    body: str
    html: str | None = None
    text: str | None = None
    link: str | None = None
    image_url: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


# --- measuring and truncating ---------------------------------------------------------------------------------

_GRAPHEME = regex.compile(r"\X")
_GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENSION = "\f^{}\\[~]|€"  # sent as ESC + one septet, so each costs two
_NOT_GSM = re.compile("[^" + re.escape(_GSM_BASIC + _GSM_EXTENSION) + "]")
_GSM_EXTENSION_CHAR = re.compile("[" + re.escape(_GSM_EXTENSION) + "]")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")  # two UTF-16 units each


def _septets(text: str) -> int:
    return len(text) + len(_GSM_EXTENSION_CHAR.findall(text))


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _utf16(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) >> 1


_MEASURE: dict[str, Callable[[str], int]] = {"chars": len, "bytes": _utf8, "utf16": _utf16, "septets": _septets}


def measure(text: str, unit: Unit = "chars") -> int:
    """Length as the provider counts it; septets is meaningful for GSM-7 text only."""
    return _MEASURE[unit](text)


# Code points that may join their neighbour into one grapheme (UAX #29 rules GB3-GB13): where neither side of a
# position is one of these, that position is a cluster boundary whatever comes before it.
_JOINS = regex.compile(
    r"[\r\p{GCB=Extend}\p{GCB=ZWJ}\p{GCB=SpacingMark}\p{GCB=Prepend}\p{GCB=Regional_Indicator}"
    r"\p{GCB=L}\p{GCB=V}\p{GCB=T}]"
)


def _boundary(text: str, i: int) -> bool:
    return i == 0 or (_JOINS.match(text, i - 1, i) is None and _JOINS.match(text, i, i + 1) is None)


def _fitting_prefix(text: str, budget: int, unit: Unit) -> int:
    """How many code points of text fit in budget units (text is longer than that)."""
    if unit == "chars":
        return budget
    if unit == "bytes":
        data = text.encode("utf-8", "surrogatepass")
        cut = budget
        while cut > 0 and data[cut] & 0xC0 == 0x80:  # not inside a multi-byte sequence
            cut -= 1
        return len(data[:cut].decode("utf-8", "surrogatepass"))
    if unit == "utf16":
        data = text.encode("utf-16-le", "surrogatepass")
        cut = 2 * budget
        if cut and 0xD8 <= data[cut - 1] <= 0xDB and 0xDC <= data[cut + 1] <= 0xDF:  # not inside a surrogate pair
            cut -= 2
        return len(data[:cut].decode("utf-16-le", "surrogatepass"))
    wide = [m.start() for m in _GSM_EXTENSION_CHAR.finditer(text)]
    i = min(budget, len(text))
    while i + bisect_left(wide, i) > budget:
        i -= 1
    return i


def truncate(text: str, max_len: int, *, unit: Unit = "chars", ellipsis: str = "…") -> str:
    """Text cut on a grapheme boundary so that it plus the ellipsis fits max_len; unchanged if it already fits.
    When even the ellipsis does not fit, the cut goes without it."""
    size = _MEASURE[unit]
    if size(text) <= max_len:
        return text
    mark = size(ellipsis)
    if mark > max_len:
        ellipsis, mark = "", 0
    budget = max(max_len - mark, 0)
    # Every code point costs at least one unit, so only the first budget+1 matter: a 100 KB text stays cheap.
    head = text[: budget + 1]
    i = _fitting_prefix(head, budget, unit)
    if not _boundary(head, i):
        # Back to a position that is surely a boundary, then segment only from there: segmenting the whole head
        # with \X would cost far more than the rest of adapt(). The cluster holding head[i] does not fit.
        start = i
        while not _boundary(head, start):
            start -= 1
        clusters = _GRAPHEME.findall(head, start, i + 1)
        i = start + sum(map(len, clusters[:-1]))
    # No dangling space before the ellipsis; CR LF goes as a pair, and a space that a Prepend mark holds stays.
    while i > 0 and head[i - 1].isspace():
        if head[i - 2 : i] == "\r\n":
            i -= 2
        elif _boundary(head, i - 1):
            i -= 1
        else:
            break
    return head[:i] + ellipsis


def sms_segments(text: str) -> tuple[Literal["GSM-7", "UCS-2"], int]:
    """Encoding and number of parts: 160/153 septets for GSM-7, 70/67 UTF-16 units for UCS-2."""
    encoding, _, parts = _sms_count(text)
    return encoding, parts


def _sms_count(text: str) -> tuple[Literal["GSM-7", "UCS-2"], int, int]:
    """Encoding, units (septets or UTF-16 units) and parts."""
    if _NOT_GSM.search(text) is None:
        encoding: Literal["GSM-7", "UCS-2"] = "GSM-7"
        units, single, part, wide = _septets(text), 160, 153, _GSM_EXTENSION_CHAR
    else:
        encoding, units, single, part, wide = "UCS-2", _utf16(text), 70, 67, _ASTRAL
    if units <= single:
        return encoding, units, 1
    # A part never ends inside an escape pair or a surrogate pair, so near a boundary a message can need one part
    # more than units/part says. Only those two-unit characters can shift a boundary: pack by jumping between them.
    parts, end = 1, part
    for before, match in enumerate(wide.finditer(text)):
        offset = match.start() + before  # in units: each earlier two-unit character adds one
        if offset >= end:
            skipped = (offset - end) // part + 1
            parts, end = parts + skipped, end + skipped * part
        if offset + 2 > end:
            parts, end = parts + 1, offset + part
    if units > end:
        parts += -(-(units - end) // part)
    return encoding, units, parts


def _sms_capacity(encoding: str, segments: int) -> int:
    if encoding == "GSM-7":
        return 160 if segments == 1 else 153 * segments
    return 70 if segments == 1 else 67 * segments


# --- markup dialects -------------------------------------------------------------------------------------------

_CM_INLINE = re.compile(r"([\\`*_\[\]<>~|])")
_CM_LINE_START = re.compile(r"^([ \t]*)([#>+\-=]|\d+[.)])", re.MULTILINE)
_TG_SPECIAL = re.compile(r"([_*\[\]()~`>#+\-=|{}.!\\])")


def _escape_commonmark(text: str) -> str:
    # Backslash escapes for what would start emphasis, links, code or HTML anywhere, and lists/headings/quotes
    # only at a line start, so ordinary punctuation in the copy stays unescaped.
    text = _CM_INLINE.sub(r"\\\1", text)
    return _CM_LINE_START.sub(lambda m: m[1] + m[2][:-1] + "\\" + m[2][-1], text)


def _escape_slack(text: str) -> str:
    # Slack mrkdwn has no backslash escapes; only &, < and > are control characters.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_telegram(text: str) -> str:
    return _TG_SPECIAL.sub(r"\\\1", text)


def _url_in_parens(url: str) -> str:
    return url.replace(" ", "%20").replace("(", "%28").replace(")", "%29")


@dataclass(frozen=True)
class _Dialect:
    escape: Callable[[str], str]
    heading: str  # takes the escaped title
    link: Callable[[str, str], str]  # (escaped label, raw url)
    image: str | None  # takes the url; None when images travel outside the text


_DIALECTS: dict[str, _Dialect] = {
    "commonmark": _Dialect(
        _escape_commonmark, "### {}", lambda label, url: f"[{label}]({_url_in_parens(url)})", "![]({})"
    ),
    "slack": _Dialect(
        _escape_slack, "*{}*", lambda label, url: f"<{_escape_slack(url).replace('|', '%7C')}|{label}>", None
    ),
    "telegram": _Dialect(
        _escape_telegram,
        "*{}*",
        lambda label, url: "[{}]({})".format(label, url.replace("\\", "\\\\").replace(")", "\\)")),
        None,
    ),
}

_LABELS: dict[str, dict[str, str]] = {
    "en": {"open": "Open", "unsubscribe": "Unsubscribe", "cta_link": "{cta}: {link}", "image": "Image"},
    "zh": {"open": "查看详情", "unsubscribe": "退订", "cta_link": "{cta}：{link}", "image": "图片"},
}

# --- choosing and fitting the text -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    kind: str
    brand: str | None
    unsubscribe_url: str | None
    lang: str
    labels: dict[str, str]


@dataclass(frozen=True)
class _Fitted:
    source: str
    text: str  # plain, as fitted
    rendered: str
    truncated: bool


def _present(value: str | None) -> bool:
    return value is not None and value.strip() != ""


def _part(content: Content, ctx: _Context, part: str) -> str | None:
    return ctx.brand if part == "brand" else getattr(content, part)


def _sources(content: Content, rules: ChannelRules) -> list[tuple[str, str]]:
    return [(part, value.strip()) for part in rules.text_from if _present(value := getattr(content, part))]


def _title(content: Content, rules: ChannelRules, ctx: _Context) -> str | None:
    if not rules.supports_title:
        return None
    for part in rules.title_from:
        value = _part(content, ctx, part)
        if _present(value):
            # One line: a title becomes a subject header or a heading, where a newline is an injection or a break.
            line = " ".join(value.split())
            if rules.title_max is None:
                return line
            return truncate(line, rules.title_max, unit=rules.unit, ellipsis=rules.ellipsis)
    return None


def _shrink(
    text: str, excess: int, render: Callable[[str], str], over: Callable[[str], int], unit: Unit, ellipsis: str
) -> tuple[str, str] | None:
    """The longest grapheme-cut of text whose rendering fits (over <= 0), with that rendering; None if none does.
    excess is over(render(text))."""
    full = measure(text, unit)
    # Exact when the rendering adds nothing per unit of text (no escaping), which is the common case.
    guess = full - excess
    hi = full - 1
    if 0 <= guess < full:
        cut = truncate(text, guess, unit=unit, ellipsis=ellipsis)
        out = render(cut)
        if over(out) <= 0:
            return (cut, out) if cut not in ("", ellipsis) else None
        hi = guess - 1
    best, lo = None, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        cut = truncate(text, mid, unit=unit, ellipsis=ellipsis)
        out = render(cut)
        if over(out) <= 0:
            best, lo = (cut, out), mid + 1
        else:
            hi = mid - 1
    # Nothing but an ellipsis is no text: the caller reports that the fixed parts leave no room.
    return best if best and best[0] not in ("", ellipsis) else None


def _fit(
    sources: list[tuple[str, str]],
    render: Callable[[str], str],
    over: Callable[[str], int],
    rules: ChannelRules,
    *,
    unit: Unit | None = None,
    ellipsis: str | None = None,
    room: int | None = None,
) -> _Fitted:
    """The first source that fits as is, else the last one truncated to fit. room bounds the units any text can
    take: every code point costs at least one, so past room+1 of them a text cannot fit and its cut is the same -
    measuring and rendering only that much keeps a long text cheap on a small channel."""
    if room is not None:
        sources = [(source, text[: room + 1]) for source, text in sources]
    excess = 0
    for source, text in sources:
        out = render(text)
        if (excess := over(out)) <= 0:
            return _Fitted(source, text, out, False)
    source, text = sources[-1]
    shrunk = _shrink(text, excess, render, over, unit or rules.unit, rules.ellipsis if ellipsis is None else ellipsis)
    if shrunk is None:
        raise AdaptationError(f"{rules.kind}: the fixed parts (title, link, signature…) leave no room for the text")
    return _Fitted(source, shrunk[0], shrunk[1], True)


def _never_over(_: str) -> int:
    return 0


def _within(unit: Unit, limit: int | None) -> Callable[[str], int]:
    if limit is None:
        return _never_over
    size = _MEASURE[unit]
    return lambda out: size(out) - limit


def _base_extra(fitted: _Fitted, dropped: list[str]) -> dict[str, Any]:
    extra: dict[str, Any] = {"source": fitted.source, "truncated": fitted.truncated, "body_text": fitted.text}
    if dropped:
        extra["dropped"] = dropped
    return extra


def _dropped(content: Content, rules: ChannelRules) -> list[str]:
    dropped = []
    if not rules.supports_title and _present(content.title):
        dropped.append("title")
    if not rules.supports_image and _present(content.image_url):
        dropped.append("image_url")
    return dropped


# --- layouts ---------------------------------------------------------------------------------------------------


def _sms(content: Content, rules: ChannelRules, ctx: _Context) -> Adapted:
    max_segments = rules.max_segments or 1
    room = _sms_capacity("GSM-7", max_segments)  # the larger of the two encodings' room
    # Cut to what could possibly fit (see _fit) before the encoding check and the call-to-action tries.
    sources = [(source, text[: room + 1]) for source, text in _sources(content, rules)]
    signature = rules.signature.format(brand=ctx.brand) if rules.signature and ctx.brand else ""
    suffix = rules.unsubscribe_suffix or ""
    link = content.link.strip() if _present(content.link) else ""

    def renderer(tail: str) -> Callable[[str], str]:
        # The link is already a short tracked URL: it goes as is, space-separated so the text never runs into it.
        return lambda text: signature + " ".join(p for p in (text, tail, suffix) if p)

    def over(out: str) -> int:
        encoding, units, segments = _sms_count(out)
        return 0 if segments <= max_segments else max(1, units - _sms_capacity(encoding, max_segments))

    fitted = None
    dropped = _dropped(content, rules)
    if link and _present(content.cta):
        # The call to action is the one optional part: kept only when some text fits whole beside it.
        with_cta = renderer(ctx.labels["cta_link"].format(cta=" ".join(content.cta.split()), link=link))
        fitted = next(
            (_Fitted(s, t, out, False) for s, t in sources if over(out := with_cta(t)) <= 0),
            None,
        )
        if fitted is None:
            dropped.append("cta")
    if fitted is None:
        render = renderer(link)
        # GSM-7 copy gets a GSM-7 ellipsis: "…" would switch the whole message to UCS-2 and halve its room.
        gsm = _NOT_GSM.search(render(sources[-1][1])) is None
        fitted = _fit(
            sources,
            render,
            over,
            rules,
            unit="septets" if gsm else "utf16",
            ellipsis="..." if gsm else "…",
        )
    encoding, units, segments = _sms_count(fitted.rendered)
    extra = _base_extra(fitted, dropped) | {"encoding": encoding, "segments": segments, "units": units}
    return Adapted(
        kind=rules.kind, body=fitted.rendered, text=fitted.rendered, link=link or None, image_url=None, extra=extra
    )


def _payload_bytes(payload: dict[str, Any]) -> int:
    # ASCII-escaped JSON is the largest form any client library sends, so the check holds however it serializes.
    return len(json.dumps(payload, separators=(",", ":")))


def _push(content: Content, rules: ChannelRules, ctx: _Context) -> Adapted:
    title = _title(content, rules, ctx)
    image = content.image_url if rules.supports_image and _present(content.image_url) else None
    link = content.link if _present(content.link) else None
    fields = {k: v for k, v in (("title", title), ("image", image), ("link", link), ("badge", rules.badge)) if v}
    within_body = _within(rules.unit, rules.body_max)
    payload_room = (rules.payload_max or 0) - rules.payload_reserve

    def over(body: str) -> int:
        excess = within_body(body)
        if rules.payload_max is None:
            return excess
        return max(excess, _payload_bytes({**fields, "body": body}) - payload_room)

    fitted = _fit(_sources(content, rules), lambda text: text, over, rules, room=rules.body_max)
    extra = _base_extra(fitted, _dropped(content, rules))
    if rules.badge is not None:
        extra["badge"] = rules.badge
    extra["payload_bytes"] = _payload_bytes({**fields, "body": fitted.text})
    return Adapted(
        kind=rules.kind, title=title, body=fitted.text, text=fitted.text, link=link, image_url=image, extra=extra
    )


_EMAIL_CSS = """
body{margin:0;padding:0;background:#f4f5f7;color:#1f2328;font-family:-apple-system,'Segoe UI',Roboto,Arial,sans-serif}
.preheader{display:none;max-height:0;max-width:0;overflow:hidden;opacity:0;mso-hide:all;font-size:1px;line-height:1px}
.wrap{max-width:600px;margin:0 auto;padding:24px;background:#ffffff}
h1{font-size:22px;line-height:1.3;margin:0 0 16px}
.hero{display:block;max-width:100%;height:auto;border:0;margin:0 0 16px}
p{font-size:16px;line-height:1.5;margin:0 0 16px}
.cta{display:inline-block;padding:12px 20px;background:#0b5fff;color:#ffffff;text-decoration:none;border-radius:6px}
.footer{font-size:12px;line-height:1.5;color:#6a737d;margin:24px 0 0}
.footer a{color:#6a737d}
"""
# Remote stylesheets are never fetched: the document is ours and rendering must not touch the network.
_INLINER = css_inline.CSSInliner(load_remote_stylesheets=False)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")


def _inlined_styles() -> dict[str, str]:
    """Each styled element's inline style, computed once: the stylesheet is constant, and inlining it per
    message cost a third of email's adapt time. A test checks the result against inlining per message."""
    sample = (
        f"<html><head><style>{_EMAIL_CSS}</style></head><body>"
        '<span class="preheader" id="s-pre"></span><div class="wrap" id="s-wrap"><h1 id="s-h1"></h1>'
        '<img class="hero" id="s-hero"><p id="s-p"></p><p id="s-ctap"><a class="cta" id="s-cta"></a></p>'
        '<p class="footer" id="s-footer"><a id="s-fa"></a></p></div></body></html>'
    )
    inlined = _INLINER.inline(sample)
    styles = {name: style for name, style in re.findall(r'id="s-(\w+)" style="([^"]*)"', inlined)}
    styles["body"] = re.search(r'<body style="([^"]*)"', inlined).group(1)
    return {name: f' style="{style}"' for name, style in styles.items()}


_STYLE = _inlined_styles()


def _paragraphs(text: str) -> str:
    paragraphs = _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n"))
    return "".join(
        f"<p{_STYLE['p']}>{html.escape(p.strip()).replace(chr(10), '<br>')}</p>" for p in paragraphs if p.strip()
    )


def _email(content: Content, rules: ChannelRules, ctx: _Context) -> Adapted:
    e = html.escape
    subject = _title(content, rules, ctx) or ""
    heading = " ".join(content.title.split()) if _present(content.title) else None
    image = content.image_url if _present(content.image_url) else None
    link = content.link if _present(content.link) else None
    label = " ".join(content.cta.split()) if _present(content.cta) else ctx.labels["open"]
    sources = _sources(content, rules)
    # The preheader is the inbox preview after the subject: the short text when it is used nowhere else.
    preview_part = next((t for s, t in sources if s == "short_text"), None)
    if preview_part is not None and (preview_part == sources[0][1] or " ".join(preview_part.split()) == subject):
        preview_part = None
    footer = []
    if ctx.brand:
        footer.append(e(ctx.brand))
    if ctx.unsubscribe_url:
        footer.append(f'<a href="{e(ctx.unsubscribe_url)}"{_STYLE["fa"]}>{e(ctx.labels["unsubscribe"])}</a>')
    top = "".join(
        (
            f"<h1{_STYLE['h1']}>{e(heading)}</h1>" if heading else "",
            f'<img class="hero" src="{e(image)}" alt="{e(heading or subject)}"{_STYLE["hero"]}>' if image else "",
        )
    )
    bottom = "".join(
        (
            f'<p{_STYLE["ctap"]}><a class="cta" href="{e(link)}"{_STYLE["cta"]}>{e(label)}</a></p>' if link else "",
            f'<p class="footer"{_STYLE["footer"]}>{" · ".join(footer)}</p>' if footer else "",
        )
    )

    def preheader_of(text: str) -> str:
        preview = " ".join((preview_part or text).split())
        return truncate(preview, rules.preheader_max, ellipsis=rules.ellipsis) if rules.preheader_max else preview

    def render(text: str) -> str:
        document = (
            f'<!DOCTYPE html><html lang="{e(ctx.lang)}"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(subject)}</title></head><body{_STYLE['body']}>"
            f'<span class="preheader"{_STYLE["pre"]}>{e(preheader_of(text))}</span>'
            f'<div class="wrap"{_STYLE["wrap"]}>{top}{_paragraphs(text)}{bottom}</div></body></html>'
        )
        return document

    fitted = _fit(sources, render, _within("bytes", rules.payload_max), rules, room=rules.payload_max)
    plain = [heading, fitted.text]
    if link:
        plain.append(f"{label}: {link}")
    if ctx.brand:
        plain.append(ctx.brand)
    if ctx.unsubscribe_url:
        plain.append(f"{ctx.labels['unsubscribe']}: {ctx.unsubscribe_url}")
    text = "\n\n".join(p for p in plain if p)
    extra = _base_extra(fitted, _dropped(content, rules))
    extra["preheader"] = preheader_of(fitted.text)
    if ctx.unsubscribe_url:
        # RFC 8058 one-click: mailbox providers POST to the URL; required of bulk senders by Gmail and Yahoo.
        extra["headers"] = {
            "List-Unsubscribe": f"<{ctx.unsubscribe_url}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }
    return Adapted(
        kind=rules.kind,
        title=subject,
        body=text,
        html=fitted.rendered,
        text=text,
        link=link,
        image_url=image,
        extra=extra,
    )


def _plain(title: str | None, text: str, label: str, link: str | None) -> str:
    return "\n\n".join(p for p in (title, text, f"{label}: {link}" if link else None) if p)


def _markdown(content: Content, rules: ChannelRules, ctx: _Context) -> Adapted:
    dialect = _DIALECTS[rules.dialect or "commonmark"]
    title = _title(content, rules, ctx)
    image = content.image_url if rules.supports_image and _present(content.image_url) else None
    link = content.link if _present(content.link) else None
    label = " ".join(content.cta.split()) if _present(content.cta) else ctx.labels["open"]
    limit = rules.caption_max if image and rules.caption_max else rules.body_max
    fixed_head = "\n\n".join(
        p
        for p in (
            # A title taken from the text (DingTalk needs one for the chat list) would repeat it as a heading.
            dialect.heading.format(dialect.escape(title)) if title and _present(content.title) else None,
            dialect.image.format(_url_in_parens(image)) if image and dialect.image else None,
        )
        if p
    )
    link_line = dialect.link(dialect.escape(label), link) if link else ""

    def render(text: str) -> str:
        return "\n\n".join(p for p in (fixed_head, dialect.escape(text), link_line) if p)

    fitted = _fit(_sources(content, rules), render, _within(rules.unit, limit), rules, room=limit)
    extra = _base_extra(fitted, _dropped(content, rules))
    if rules.dialect == "telegram":
        extra["parse_mode"] = "MarkdownV2"
    return Adapted(
        kind=rules.kind,
        title=title,
        body=fitted.rendered,
        text=_plain(title, fitted.text, label, link),
        link=link,
        image_url=image,
        extra=extra,
    )


def _sections(text: str, limit: int, escape: Callable[[str], str]) -> list[str]:
    """Escaped text in pieces of at most limit chars, cut between graphemes, at whitespace where one is near."""
    if len(escaped := escape(text)) <= limit:
        return [escaped]
    pieces, current, used = [], [], 0
    for cluster in _GRAPHEME.findall(text):
        cost = len(piece := escape(cluster))
        if cost > limit:
            # One grapheme longer than a whole section (a run of Prepend marks, say) cannot be sent whole and
            # must not be split: it is left out, and the gap is marked.
            piece, cost = "…", 1
        if used + cost > limit:
            back = next((i for i in range(len(current) - 1, max(len(current) - 200, 0), -1) if current[i].isspace()), 0)
            cut = back + 1 if back else len(current)
            pieces.append("".join(current[:cut]).rstrip())
            current = current[cut:]
            used = sum(map(len, current))
        current.append(piece)
        used += cost
    pieces.append("".join(current).rstrip())
    return [p for p in pieces if p]


def _slack(content: Content, rules: ChannelRules, ctx: _Context) -> Adapted:
    adapted = _markdown(content, rules, ctx)
    blocks: list[dict[str, Any]] = []
    if adapted.title:
        blocks.append({"type": "header", "text": {"type": "plain_text", "text": adapted.title, "emoji": True}})
    if adapted.image_url:
        alt = adapted.title or ctx.labels["image"]
        blocks.append({"type": "image", "image_url": adapted.image_url, "alt_text": alt})
    blocks += [
        {"type": "section", "text": {"type": "mrkdwn", "text": piece}}
        for piece in _sections(adapted.extra["body_text"], rules.section_max or 3000, _escape_slack)
    ]
    if adapted.link:
        label = truncate(" ".join(content.cta.split()), 75) if _present(content.cta) else ctx.labels["open"]
        button = {"type": "button", "text": {"type": "plain_text", "text": label}, "url": adapted.link}
        blocks.append({"type": "actions", "elements": [button]})
    adapted.extra["blocks"] = blocks
    return adapted


def _card_bytes(card: dict[str, Any]) -> int:
    return len(json.dumps(card, separators=(",", ":")))


def _card(content: Content, rules: ChannelRules, ctx: _Context) -> Adapted:
    title = _title(content, rules, ctx)
    link = content.link if _present(content.link) else None
    label = " ".join(content.cta.split()) if _present(content.cta) else ctx.labels["open"]

    def card_of(text: str) -> dict[str, Any]:
        # plain_text rather than lark_md: the copy is plain, and then nothing in it needs escaping.
        elements: list[dict[str, Any]] = [{"tag": "div", "text": {"tag": "plain_text", "content": text}}]
        if link:
            button = {"tag": "button", "text": {"tag": "plain_text", "content": label}, "type": "primary", "url": link}
            elements.append({"tag": "action", "actions": [button]})
        card: dict[str, Any] = {"config": {"wide_screen_mode": True}, "elements": elements}
        if title:
            card["header"] = {"title": {"tag": "plain_text", "content": title}, "template": "blue"}
        return card

    limit = rules.payload_max
    fitted = _fit(
        _sources(content, rules),
        lambda text: text,
        lambda text: _card_bytes(card_of(text)) - limit if limit else 0,
        rules,
        room=limit,
    )
    extra = _base_extra(fitted, _dropped(content, rules))
    extra["card"] = card_of(fitted.text)
    return Adapted(
        kind=rules.kind,
        title=title,
        body=fitted.text,
        text=_plain(title, fitted.text, label, link),
        link=link,
        image_url=None,
        extra=extra,
    )


def _json(content: Content, rules: ChannelRules, ctx: _Context) -> Adapted:
    fitted = _fit(_sources(content, rules), lambda text: text, _never_over, rules)
    extra = _base_extra(fitted, [])
    # Every key always present, so receivers can rely on the shape.
    extra["json"] = {
        **content.model_dump(),
        "brand": ctx.brand,
        "locale": ctx.lang,
        "unsubscribe_url": ctx.unsubscribe_url,
    }
    return Adapted(
        kind=rules.kind,
        title=content.title,
        body=fitted.text,
        text=fitted.text,
        link=content.link,
        image_url=content.image_url,
        extra=extra,
    )


def _inbox(content: Content, rules: ChannelRules, ctx: _Context) -> Adapted:
    title = _title(content, rules, ctx)
    fitted = _fit(
        _sources(content, rules), lambda text: text, _within(rules.unit, rules.body_max), rules, room=rules.body_max
    )
    extra = _base_extra(fitted, [])
    if _present(content.cta):
        extra["cta"] = content.cta.strip()
    return Adapted(
        kind=rules.kind,
        title=title,
        body=fitted.text,
        text=fitted.text,
        link=content.link,
        image_url=content.image_url,
        extra=extra,
    )


_LAYOUTS: dict[str, Callable[[Content, ChannelRules, _Context], Adapted]] = {
    "sms": _sms,
    "push": _push,
    "email": _email,
    "markdown": _markdown,
    "slack": _slack,
    "card": _card,
    "json": _json,
    "inbox": _inbox,
}
_UNSAFE_SCHEME = re.compile(r"(javascript|vbscript|data|file):", re.IGNORECASE)
_TAB_OR_NEWLINE = re.compile(r"[\t\n\r]")
_C0_OR_SPACE = "".join(map(chr, range(0x21)))
_NOT_IN_URL = re.compile(r'[\x00-\x20\x7f<>"]')


def _url_problem(url: str) -> str | None:
    # Browsers drop leading controls and tabs/newlines anywhere, so "\x01java\tscript:" is still a script.
    if _UNSAFE_SCHEME.match(_TAB_OR_NEWLINE.sub("", url).lstrip(_C0_OR_SPACE)):
        return "has an unsafe scheme"
    # Whitespace, quotes and angle brackets end a URL early in SMS and markdown, or break a header (List-Unsubscribe).
    if _NOT_IN_URL.search(url):
        return "has characters a URL cannot hold"
    return None


def _tightened(rules: ChannelRules, title_max: int | None, body_max: int | None) -> ChannelRules:
    """Only limits the format already counts are tightened, in the format's own unit: an SMS's
    length is its segments, not a body limit."""
    update = {}
    if title_max is not None and rules.title_max is not None and title_max < rules.title_max:
        update["title_max"] = title_max
    if body_max is not None and rules.body_max is not None and body_max < rules.body_max:
        update["body_max"] = body_max
    return rules.model_copy(update=update) if update else rules


def adapt(
    content: Content,
    kind: str,
    *,
    brand: str | None = None,
    unsubscribe_url: str | None = None,
    locale: str | None = None,
    provider_max: tuple[int | None, int | None] = (None, None),
) -> Adapted:
    """The content in the format and within the limits of channel kind; AdaptationError if it cannot be.
    `provider_max` (title, body) tightens the format's limits to what the channel's providers take
    (a WeCom app message holds half of what a WeCom bot does)."""
    rules = RULES.get(kind)
    if rules is None:
        raise LookupError(f"no channel rules for kind {kind!r}")
    rules = _tightened(rules, *provider_max)
    urls = {"link": content.link, "image_url": content.image_url}
    if any(url and url != url.strip() for url in urls.values()):
        content = content.model_copy(update={name: url.strip() if url else url for name, url in urls.items()})
    unsubscribe_url = unsubscribe_url.strip() if unsubscribe_url and unsubscribe_url.strip() else None
    for name, url in (("link", content.link), ("image_url", content.image_url), ("unsubscribe_url", unsubscribe_url)):
        # Links land in href/src attributes, markdown and headers: a bad one is an injection, not a typo to send.
        if url and (problem := _url_problem(url)):
            raise AdaptationError(f"{kind}: {name} {problem}")
    brand = brand.strip() if _present(brand) else None
    lang = (locale or rules.locale).replace("_", "-")
    ctx = _Context(kind, brand, unsubscribe_url, lang, _LABELS.get(lang.split("-")[0].lower(), _LABELS["en"]))
    for group in rules.required:
        if not any(_present(_part(content, ctx, part)) for part in group):
            raise AdaptationError(f"{kind} needs {' or '.join(group)}")
    return _LAYOUTS[rules.layout](content, rules, ctx)
