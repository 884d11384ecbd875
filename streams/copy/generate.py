"""Copy generation: a brief (product, campaign, persona, fields, channels) in, typed copy bundles out — every
candidate compiled by the copy language and fitted to each target channel before it is accepted, and a rejected
one asked for again with the reasons.

Pure apart from the writer it is given (an LLM client, or the offline phrase-table writer in streams.copy.offline).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.config import Campaign, CampaignVariant, Template
from streams.copy.channels import RULES, AdaptationError, Content, adapt, measure
from streams.copy.language import MissingField, RenderTimeout, TemplateSyntaxError, compile_template
from streams.copy.variants import BetaPrior

Phase = Literal["warm-up", "peak", "long-tail"]
Language = Literal["zh", "en"]
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*$")
# Where a check renders the campaign's link and unsubscribe page: about as long as the tracked short links render
# and the per-user unsubscribe URL make them.
SAMPLE_LINK = "https://lc.example.com/s/Ab3dE5gH7k"
SAMPLE_UNSUBSCRIBE = "https://lc.example.com/u/eyJ1IjoidXNlci0wMDAxIiwiYyI6InNtcyJ9.c2lnbmF0dXJl"
# Approaches a campaign's variants take, one per variant, so an A/B test compares different ideas.
ANGLES = ("benefit", "scarcity", "price", "social proof", "urgency")


class Product(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    price: str | None = None
    selling_points: list[str] = Field(default_factory=list, max_length=10)


class CampaignBrief(BaseModel):
    model_config = ConfigDict(extra="forbid")
    goal: str = Field(min_length=1)
    phase: Phase = "peak"
    offer: str | None = None
    tone: str = "friendly"
    language: Language = "zh"


class CopyBrief(BaseModel):
    """What the copy is for; `fields` are template fields every text must keep, `channels` keys of RULES."""

    model_config = ConfigDict(extra="forbid")
    product: Product
    campaign: CampaignBrief
    persona: str = Field(min_length=1, description="The audience persona, in a sentence or two.")
    fields: list[str] = Field(default_factory=list, max_length=20)
    channels: list[str] = Field(min_length=1)
    variants: int = Field(default=3, ge=1, le=5)
    # Shown as the SMS signature and similar; its length counts against the channel's room.
    brand: str = Field(default="Loopcast", min_length=1, max_length=20)
    # What a field renders to when the copy is checked; unnamed fields get a typical value.
    samples: dict[str, str] = Field(default_factory=dict)
    image_url: str | None = None

    @field_validator("fields")
    @classmethod
    def _paths(cls, fields: list[str]) -> list[str]:
        bad = [f for f in fields if not _PATH.match(f)]
        if bad:
            raise ValueError(f"not field paths: {bad}")
        return list(dict.fromkeys(fields))

    @field_validator("channels")
    @classmethod
    def _known_channels(cls, channels: list[str]) -> list[str]:
        unknown = [c for c in channels if c not in RULES]
        if unknown:
            raise ValueError(f"unknown channel formats {unknown}; known: {sorted(RULES)}")
        return list(dict.fromkeys(channels))


class CopyBundle(BaseModel):
    """One candidate copy: the parts of a Template (title, body, long text, image, call to action) plus a prompt
    for whoever makes the image."""

    model_config = ConfigDict(extra="ignore")
    title: str = Field(min_length=1, max_length=300)
    short_text: str = Field(min_length=1, max_length=2000)
    long_text: str = Field(min_length=1, max_length=20000)
    image_prompt: str = Field(min_length=1, max_length=2000)
    image_url: str | None = None
    cta: str = Field(min_length=1, max_length=60)


class CopyExample(BaseModel):
    """Copy that performed well before (from the knowledge base), shown to the writer as a few-shot example."""

    title: str | None = None
    short_text: str
    long_text: str | None = None
    cta: str | None = None
    ctr: float = Field(ge=0, le=1)
    cvr: float = Field(ge=0, le=1)


class GeneratedCopy(BaseModel):
    variant: int
    attempts: int
    bundle: CopyBundle


class RejectedAttempt(BaseModel):
    variant: int
    attempt: int
    problems: list[str]
    output: str


class GenerationResult(BaseModel):
    """`source` is "offline" for the phrase-table fallback, else "llm:<model>"."""

    source: str
    accepted: list[GeneratedCopy] = Field(default_factory=list)
    rejected: list[RejectedAttempt] = Field(default_factory=list)
    # Variants for which no attempt was accepted.
    failed: list[int] = Field(default_factory=list)


# (variant, event, amount): "attempt" with its number, "delta" with characters received so far, "accepted" or
# "rejected" with the attempt number.
Progress = Callable[[int, str, int], None]


class Writer(Protocol):
    source: str

    async def write(
        self,
        brief: CopyBrief,
        messages: list[dict[str, str]],
        *,
        variant: int,
        attempt: int,
        on_delta: Callable[[int], None] | None = None,
    ) -> str:
        """The writer's answer: a JSON object (text), however well it followed the instructions."""
        ...

    async def close(self) -> None: ...


# --- the schema and the chat -----------------------------------------------------------------------------------


def bundle_schema() -> dict[str, Any]:
    """CopyBundle's JSON schema in the form strict structured output takes: every property required (image_url
    nullable), no others."""
    schema = CopyBundle.model_json_schema()
    properties = {}
    for name, prop in schema["properties"].items():
        prop = {k: v for k, v in prop.items() if k not in ("title", "default")}
        properties[name] = prop
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_UNIT_NAMES = {"chars": "characters", "bytes": "UTF-8 bytes", "utf16": "UTF-16 units", "septets": "GSM septets"}


def _channel_hint(kind: str, brief: CopyBrief) -> str:
    rules = RULES[kind]
    unit = _UNIT_NAMES[rules.unit]
    bits = []
    if rules.supports_title and rules.title_max:
        bits.append(f"title at most {rules.title_max} {unit}")
    if rules.layout == "sms":
        per_part = 67 if brief.campaign.language == "zh" else 153
        bits.append(
            f"the whole SMS ({rules.signature.format(brand=brief.brand) if rules.signature else ''} signature, "
            f"short_text, cta, link and the opt-out '{rules.unsubscribe_suffix}') in {rules.max_segments} parts "
            f"of about {per_part} characters: keep short_text under {per_part * (rules.max_segments or 1) // 2}"
        )
    elif rules.body_max:
        bits.append(f"short_text at most {rules.body_max} {unit}")
    return f"- {kind}: " + ("; ".join(bits) or "no tight limit")


def _example_text(example: CopyExample) -> str:
    parts = {k: v for k, v in example.model_dump(include={"title", "short_text", "long_text", "cta"}).items() if v}
    return f"CTR {example.ctr:.1%}, CVR {example.cvr:.1%}: {json.dumps(parts, ensure_ascii=False)}"


def brief_payload(brief: CopyBrief, variant: int) -> dict[str, Any]:
    """The brief as the writer reads it (and the sandbox parses it back): one JSON line of the prompt."""
    return {**brief.model_dump(exclude={"samples", "variants"}), "variant": variant, "angle": angle(variant)}


def angle(variant: int) -> str:
    return ANGLES[variant % len(ANGLES)]


BRIEF_LINE = "Brief: "
RETRY_LINE = "Attempt {attempt}: your previous answer was rejected:"


def messages_for(
    brief: CopyBrief,
    examples: Sequence[CopyExample] = (),
    problems: Sequence[str] = (),
    *,
    variant: int = 0,
    attempt: int = 1,
    previous: str | None = None,
) -> list[dict[str, str]]:
    """The chat for one candidate; with `problems`, the previous answer and why it was rejected come last."""
    language = "Simplified Chinese" if brief.campaign.language == "zh" else "English"
    fields = ", ".join(f"${{{f}}}" for f in brief.fields) or "(none)"
    system = "\n".join(
        [
            "You write marketing copy for a messaging platform. Answer with ONE JSON object and nothing else (no "
            "markdown, no code fences) with the keys title, short_text, long_text, image_prompt, image_url, cta.",
            f"Write in {language}, in a {brief.campaign.tone} tone, for the audience described.",
            "short_text goes to SMS and push; long_text to email and chat apps; cta is a 2-6 word call to action; "
            "image_prompt describes a product image; image_url is null unless the brief gives one.",
            f"Template fields: write them exactly as ${{field}}. Both short_text and long_text must use every one "
            f"of these: {fields}. Use no other field.",
            "You may use conditions on a field, always closed: <#if stock < 5>...</#if>.",
            "Limits, measured after fields are filled in (brand, link and opt-out are added by the platform):",
            *(_channel_hint(kind, brief) for kind in brief.channels),
        ]
    )
    user = [
        f"Write variant {variant + 1} of {brief.variants}; its angle: {angle(variant)}.",
        BRIEF_LINE + json.dumps(brief_payload(brief, variant), ensure_ascii=False),
    ]
    if examples:
        user.append("Copy that performed best before, for style (not to copy):")
        user += [f"- {_example_text(e)}" for e in examples]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(user)}]
    if problems:
        if previous is not None:
            messages.append({"role": "assistant", "content": previous})
        retry = [RETRY_LINE.format(attempt=attempt), *(f"- {p}" for p in problems)]
        retry.append("Answer again with the whole JSON object, fixing every point.")
        messages.append({"role": "user", "content": "\n".join(retry)})
    return messages


# --- reading and checking an answer ----------------------------------------------------------------------------

_FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?```$", re.S)


def parse_bundle(text: str) -> CopyBundle | list[str]:
    """The answer as a bundle, or the problems to send back. A JSON object wrapped in a markdown code fence is read
    anyway: models often add one, and the content is still what was asked for."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        data = json.loads(text)
    except ValueError as exc:
        return [f"the answer is not valid JSON ({exc}): answer with one JSON object only"]
    if not isinstance(data, dict):
        return ["the answer must be one JSON object with the keys title, short_text, long_text, image_prompt, cta"]
    try:
        return CopyBundle.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(p) for p in error["loc"]) or "the answer"
            problems.append(f"{where} is missing" if error["type"] == "missing" else f"{where}: {error['msg']}")
        return problems


TEMPLATE_PARTS = ("title", "short_text", "long_text", "image_url", "cta")
# Parts every required field must appear in: the texts a channel shows as the message.
TEXT_PARTS = ("short_text", "long_text")
_TYPICAL = {
    "zh": {"name": "王小红", "product_name": "降噪耳机 Pro", "stock": "3", "price": "299"},
    "en": {"name": "Alexandra", "product_name": "Noise-cancelling Headphones", "stock": "3", "price": "49.99"},
}


def _root(path: str) -> str:
    """A field as the brief names it: `${user.name}` and `${event.stock}` are the same data as `${name}`, `${stock}`
    (streams.render puts the profile and the event at the top level too)."""
    head, _, rest = path.partition(".")
    return rest if head in ("user", "event") and rest else path


def sample_values(brief: CopyBrief) -> list[dict[str, Any]]:
    """Values the copy is rendered with to be measured: typical ones, then numbers flipped to reach the other
    branch of a condition (stock 3, then stock 50)."""
    typical = _TYPICAL[brief.campaign.language]
    base: dict[str, str] = {}
    for path in brief.fields:
        leaf = path.rsplit(".", 1)[-1]
        if path == "product_name" or leaf == "product_name":
            value = brief.product.name
        elif path in ("price",) and brief.product.price:
            value = brief.product.price
        else:
            value = typical.get(leaf, "2026-11-11" if "date" in leaf.lower() else leaf.replace("_", " "))
        base[path] = brief.samples.get(path, value)
    flipped = {k: ("50" if v.isdigit() else v) for k, v in base.items()}
    sets = [base] if flipped == base else [base, flipped]
    return [_nested(values) for values in sets]


def _nested(flat: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return out


def check(bundle: CopyBundle, brief: CopyBrief, *, link: str | None = SAMPLE_LINK) -> list[str]:
    """Why this candidate cannot be saved (empty: it can): a part that does not compile, a required field not used
    or an unknown one used, or content that a target channel would have to cut."""
    problems: list[str] = []
    templates = {}
    for part in TEMPLATE_PARTS:
        source = getattr(bundle, part)
        if not source:
            continue
        try:
            templates[part] = compile_template(source)
        except TemplateSyntaxError as exc:
            problems.append(f"{part} does not compile: {exc}")
    allowed = {_root(f) for f in brief.fields}
    for part, template in templates.items():
        used = {_root(f) for f in template.fields}
        for unknown in sorted(used - allowed):
            listed = ", ".join(f"${{{f}}}" for f in brief.fields) or "none"
            problems.append(f"{part} uses the field ${{{unknown}}}, which is not one you may use ({listed})")
        if part in TEXT_PARTS:
            for required in brief.fields:
                if _root(required) not in used:
                    problems.append(f"{part} does not use the field ${{{required}}}")
    if problems:
        return problems
    for values in sample_values(brief):
        try:
            parts = {part: template.render(values) for part, template in templates.items()}
        except (MissingField, RenderTimeout, TemplateError) as exc:
            problems.append(f"the copy does not render: {exc}")
            continue
        content = Content(
            title=parts.get("title"),
            short_text=parts.get("short_text"),
            long_text=parts.get("long_text"),
            image_url=parts.get("image_url"),
            link=link,
            cta=parts.get("cta"),
        )
        # The short text must fit alone as well: a channel uses the long text only when it fits, and what small
        # channels are written for is the short text.
        short_only = content.model_copy(update={"long_text": None})
        for kind in brief.channels:
            problems += fit_problems(content, kind, brief.brand) + fit_problems(short_only, kind, brief.brand)
    return list(dict.fromkeys(problems))


def fit_problems(content: Content, kind: str, brand: str | None) -> list[str]:
    """What channel `kind` would have to cut or drop from this rendered content, with lengths and limits."""
    rules = RULES[kind]
    try:
        adapted = adapt(content, kind, brand=brand, unsubscribe_url=SAMPLE_UNSUBSCRIBE)
    except AdaptationError as exc:
        return [f"{kind}: {exc}"]
    problems = []
    unit = _UNIT_NAMES[rules.unit]
    title = " ".join(content.title.split()) if content.title else ""
    if rules.supports_title and title and rules.title_from[0] == "title" and rules.title_max is not None:
        length = measure(title, rules.unit)
        if length > rules.title_max:
            problems.append(f"{kind}: the title is {length} {unit} once rendered; the limit is {rules.title_max}")
    if adapted.extra.get("truncated"):
        source = adapted.extra["source"]
        full = measure((getattr(content, source) or "").strip(), rules.unit)
        kept = measure(adapted.extra["body_text"].removesuffix(rules.ellipsis).removesuffix("..."), rules.unit)
        if rules.layout == "sms":
            limit = f"{rules.max_segments} SMS parts with the signature, cta, link and opt-out"
        elif rules.body_max is not None:
            limit = f"the limit is {rules.body_max}"
        else:
            limit = "beside the other parts"
        problems.append(f"{kind}: {source} is {full} {unit} once rendered; only {kept} fit ({limit}): shorten it")
    if "cta" in adapted.extra.get("dropped", []):
        problems.append(f"{kind}: the cta does not fit beside short_text and the link; shorten short_text or the cta")
    return problems


# --- the loop --------------------------------------------------------------------------------------------------


def _same(a: CopyBundle, b: CopyBundle) -> bool:
    return " ".join(a.short_text.split()) == " ".join(b.short_text.split())


async def generate(
    brief: CopyBrief,
    writer: Writer,
    examples: Sequence[CopyExample] = (),
    *,
    attempts: int = 4,
    on_progress: Progress | None = None,
) -> GenerationResult:
    """brief.variants candidates, written concurrently; each is checked, and asked for again with the reasons
    until one is accepted or `attempts` are spent. Writer errors (the endpoint down after its own retries)
    propagate: they are not the copy's fault."""
    result = GenerationResult(source=writer.source)
    accepted: dict[int, GeneratedCopy] = {}

    def note(variant: int, event: str, amount: int) -> None:
        if on_progress is not None:
            on_progress(variant, event, amount)

    async def one(variant: int) -> None:
        problems: list[str] = []
        previous: str | None = None
        for attempt in range(1, attempts + 1):
            note(variant, "attempt", attempt)
            messages = messages_for(brief, examples, problems, variant=variant, attempt=attempt, previous=previous)
            output = await writer.write(
                brief,
                messages,
                variant=variant,
                attempt=attempt,
                on_delta=lambda chars: note(variant, "delta", chars),
            )
            parsed = parse_bundle(output)
            if isinstance(parsed, CopyBundle):
                problems = check(parsed, brief)
                twin = next((v for v, c in accepted.items() if _same(c.bundle, parsed)), None)
                if not problems and twin is not None:
                    problems = [f"this repeats variant {twin + 1}: write a different short_text"]
            else:
                problems = parsed
            if not problems:
                accepted[variant] = GeneratedCopy(variant=variant, attempts=attempt, bundle=parsed)
                note(variant, "accepted", attempt)
                return
            result.rejected.append(RejectedAttempt(variant=variant, attempt=attempt, problems=problems, output=output))
            note(variant, "rejected", attempt)
            previous = output
        result.failed.append(variant)

    await asyncio.gather(*(one(v) for v in range(brief.variants)))
    result.accepted = [accepted[v] for v in sorted(accepted)]
    result.failed.sort()
    result.rejected.sort(key=lambda r: (r.variant, r.attempt))
    return result


def to_template(
    bundle: CopyBundle, template_id: str, *, link: str | None = None, version: int = 1, source: str = "offline"
) -> Template:
    """The bundle as a Template document; the link is the campaign's (where a click lands), not the writer's, and
    `source` the result's ("offline" or "llm:<model>"), so the knowledge base can tell whose copy converted."""
    return Template(
        id=template_id,
        version=version,
        source=source,
        title=bundle.title,
        body=bundle.short_text,
        long_text=bundle.long_text,
        image_url=bundle.image_url,
        link=link,
        cta=bundle.cta,
    )


GENERATED_PREFIX = "gen-"


def generated_variant_ids(campaign: Campaign, count: int) -> list[str]:
    """Variant ids for one generation of copy, new with every version of the campaign ("gen-<version>-<n>"):
    outcomes carry the variant id and the knowledge base maps (campaign, variant) to its latest copy, so a
    reused id would credit one generation's sends to the next one's copy."""
    return [f"{GENERATED_PREFIX}{campaign.version + 1}-{i + 1}" for i in range(count)]


def with_generated_variants(
    campaign: Campaign, template_ids: Sequence[str], priors: Mapping[str, BetaPrior] | None = None
) -> Campaign:
    """The campaign's next version, testing the generated templates beside its hand-written copy (a single
    template becomes variant "a"); earlier generated variants are replaced. `priors` (by template id, from
    connectors.knowledge.prior_for) are where the bandit starts each new variant. ValueError past 5 variants."""
    hand = [v for v in campaign.variants if not v.id.startswith(GENERATED_PREFIX)]
    if not campaign.variants and campaign.template_id:
        hand = [CampaignVariant(id="a", template_id=campaign.template_id)]
    ids = generated_variant_ids(campaign, len(template_ids))
    priors = priors or {}
    generated = [
        CampaignVariant(id=v, template_id=t, prior=priors.get(t)) for v, t in zip(ids, template_ids, strict=True)
    ]
    variants = hand + generated
    if not 2 <= len(variants) <= 5:
        raise ValueError(
            f"campaign {campaign.id} would have {len(variants)} variants ({len(hand)} hand-written, "
            f"{len(generated)} generated); an A/B test takes 2 to 5"
        )
    experiment = campaign.experiment
    if experiment is not None and experiment.fallback not in {v.id for v in variants}:
        # The experiment's settings stay; its fallback is the hand-written copy (or the first generated one).
        experiment = experiment.model_copy(update={"fallback": variants[0].id})
    update = {"version": campaign.version + 1, "template_id": None, "variants": variants, "experiment": experiment}
    return Campaign.model_validate({**campaign.model_dump(), **update})
