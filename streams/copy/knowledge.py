"""The copy knowledge base's pure logic: the literal text of a template (what operators wrote, not its fields
or tags), the keywords and phrases in it, rates with a confidence lower bound, and Beta priors for new copy.
Used by the knowledge job (jobs/knowledge.py) and its readers (connectors/knowledge.py)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

import jinja2
from jinja2 import nodes

from streams.copy.language import to_jinja
from streams.copy.variants import BetaPrior

Kind = Literal["template", "keyword", "phrase"]
KINDS: tuple[Kind, ...] = ("template", "keyword", "phrase")

# The parts that are copy people read; image_url and link are addresses.
TEXT_PARTS = ("title", "body", "long_text", "cta")
# z of the 95 % Wilson lower bound; the same number is in infra/clickhouse/010_copy_knowledge.sql.
Z = 1.96
# Fewer sends than this and a rate says too little to rank or to lend a prior.
MIN_SENDS = 30
# A prior from similar copy counts as at most this many sends: a new variant's own sends soon outweigh it.
PRIOR_CAP = 100

_PARSER = jinja2.Environment()  # parses only (never renders): the template's literal text is TemplateData
_HTML_TAG = re.compile(r"<[^<>]{1,500}>")
_HTML_ENTITY = re.compile(r"&(?:[a-z]+|#\d+);", re.IGNORECASE)
# A run of Han characters, or a Latin word (letters and digits, inner apostrophes or hyphens).
_TOKEN = re.compile(
    r"(?P<han>[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)"
    r"|(?P<latin>[A-Za-z0-9\u00c0-\u024f]+(?:['’-][A-Za-z0-9\u00c0-\u024f]+)*)"
)
# Punctuation (Latin or CJK) and line breaks (where a field or tag was) end a phrase.
_SEGMENT = re.compile(r"[^\s\w'’-]+|\n+|\u3000+")
STOPWORDS = frozenset(
    "a an and are as at be by for from has have i if in is it its of on or our so that the this to us we with you "
    "your yours my me".split()
)


def literal_text(source: str) -> str:
    """The words a template always or sometimes shows, without `${field}`s, `<#if>`/`<#list>` tags, native
    Jinja or HTML markup. Each removed piece becomes a line break, so no phrase spans a field."""
    tree = _PARSER.parse(to_jinja(source))
    pieces = [node.data for node in tree.find_all(nodes.TemplateData)]
    text = "\n".join(_HTML_TAG.sub("\n", piece) for piece in pieces)
    text = _HTML_ENTITY.sub(" ", text)
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def copy_text(parts: Mapping[str, str | None]) -> str:
    """The literal text of a template's readable parts (title, body, long text, call to action)."""
    return "\n".join(literal_text(parts[p]) for p in TEXT_PARTS if parts.get(p))


def terms(text: str) -> set[tuple[Kind, str]]:
    """Keywords and phrases of literal copy, each once. Latin text: words (lower-cased, stopwords and bare
    numbers left out) are keywords, runs of 2–3 words phrases. Chinese has no spaces to split on: character
    bigrams are its keywords and trigrams its phrases. Punctuation, line breaks and a change of script end a
    phrase."""
    found: set[tuple[Kind, str]] = set()
    for segment in _SEGMENT.split(text):
        words: list[str] = []
        for match in _TOKEN.finditer(segment):
            if match.lastgroup == "han":
                _word_terms(words, found)
                words = []
                run = match.group()
                found.update(("keyword", run[i : i + 2]) for i in range(len(run) - 1))
                found.update(("phrase", run[i : i + 3]) for i in range(len(run) - 2))
            else:
                words.append(match.group().lower())
        _word_terms(words, found)
    return found


def _word_terms(words: list[str], found: set[tuple[Kind, str]]) -> None:
    def filler(word: str) -> bool:
        return word in STOPWORDS or word.isdigit()

    found.update(("keyword", w) for w in words if not filler(w) and len(w) > 1)
    for size in (2, 3):
        for i in range(len(words) - size + 1):
            gram = words[i : i + size]
            if not all(filler(w) for w in gram):
                found.add(("phrase", " ".join(gram)))


def wilson_lower(successes: float, trials: float, z: float = Z) -> float:
    """The Wilson score interval's lower bound for successes / trials (0 with no trials)."""
    if trials <= 0:
        return 0.0
    p = successes / trials
    z2 = z * z
    centre = p + z2 / (2 * trials)
    spread = z * math.sqrt(max(0.0, p * (1 - p) / trials + z2 / (4 * trials * trials)))
    return max(0.0, (centre - spread) / (1 + z2 / trials))


def rates(sends: int, clicks: int, conversions: int) -> dict[str, float]:
    """ctr, cvr (per send) and their lower bounds."""
    return {
        "ctr": clicks / sends if sends else 0.0,
        "cvr": conversions / sends if sends else 0.0,
        "ctr_lower": wilson_lower(clicks, sends),
        "cvr_lower": wilson_lower(conversions, sends),
    }


def beta_prior(successes: float, exposures: float, *, cap: int = PRIOR_CAP) -> BetaPrior:
    """Beta(1 + m p, 1 + m (1 - p)) for the pooled rate p of similar copy, with m = min(exposures, cap)
    pseudo-exposures: what the rate is believed to be, worth at most `cap` sends of evidence."""
    if exposures <= 0:
        return BetaPrior()
    weight = min(exposures, cap)
    rate = successes / exposures
    return BetaPrior(alpha=1 + weight * rate, beta=1 + weight * (1 - rate))


def library_rows(documents: Iterable[Any], seen_at: datetime, *, source: str | None = None) -> list[dict[str, Any]]:
    """copy_library rows for config documents (schemas.config Campaign, Template, Channel): one per
    template behind each campaign variant (variant '' for a campaign's single template), and one with
    campaign '' for a template no campaign uses. `source` overrides each template's own."""
    from schemas.config import Campaign, Channel, Template

    documents = list(documents)
    templates = {d.id: d for d in documents if isinstance(d, Template)}
    channels = {d.id: d for d in documents if isinstance(d, Channel)}
    used: set[str] = set()
    rows: list[dict[str, Any]] = []

    def row(template: Template, campaign: Campaign | None, variant: str) -> dict[str, Any]:
        channel = channels.get(campaign.channel) if campaign else None
        return {
            "template_id": template.id,
            "version": template.version,
            "campaign_id": campaign.id if campaign else "",
            "variant": variant,
            "channel": campaign.channel if campaign else "",
            "channel_format": channel.format if channel else "",
            "trigger_event": campaign.trigger.event_type if campaign else "",
            "title": template.title,
            "body": template.body,
            "long_text": template.long_text,
            "cta": template.cta,
            "text": copy_text(template.parts()),
            "source": source or template.source,
            "seen_at": seen_at,
        }

    for campaign in sorted((d for d in documents if isinstance(d, Campaign)), key=lambda c: c.id):
        pairs = [(v.id, v.template_id) for v in campaign.variants] or [("", campaign.template_id)]
        for variant, template_id in pairs:
            if template_id in templates:
                used.add(template_id)
                rows.append(row(templates[template_id], campaign, variant))
    rows.extend(row(t, None, "") for tid, t in sorted(templates.items()) if tid not in used)
    return rows
