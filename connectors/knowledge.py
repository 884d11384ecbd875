"""Reading the copy knowledge base (infra/clickhouse/010_copy_knowledge.sql, jobs/knowledge.py): the best copy
as few-shot examples for the copy generator, Beta priors for new variants (CampaignVariant.prior, which the
bandit starts from), the insights people read, and recording copy into copy_library."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from streams.copy.knowledge import KINDS, MIN_SENDS, PRIOR_CAP, Kind, beta_prior, copy_text, library_rows, terms
from streams.copy.variants import BetaPrior, Metric

if TYPE_CHECKING:
    from connectors.warehouse import Warehouse
    from schemas.config import Document
    from streams.copy.generate import CopyExample

LIBRARY = "copy_library"
KNOWLEDGE = "copy_knowledge"
# The ranking column per metric: the lower bound, so thin evidence does not rank first.
_LOWER = {"ctr": "ctr_lower", "cvr": "cvr_lower"}


def record_copy(
    warehouse: Warehouse, documents: Iterable[Document], *, source: str | None = None, seen_at: datetime | None = None
) -> int:
    """Put the copy of these templates (and the campaigns and channels that use them) into copy_library;
    `source` ("human", "llm:<model>", "offline") overrides the templates' own. Repeating it is harmless:
    rows collapse on (template, version, campaign, variant)."""
    from schemas.models import now_utc

    rows = library_rows(documents, seen_at or now_utc(), source=source)
    return warehouse.insert(LIBRARY, rows) if rows else 0


_FEW_SHOT_SQL = """
SELECT p.template_id AS template_id, any(l.title) AS title, any(l.body) AS short_text,
       any(l.long_text) AS long_text,
       any(l.cta) AS cta, any(l.channel_format) AS channel_format, any(l.trigger_event) AS trigger_event,
       any(l.source) AS source, sum(p.sends) AS sends, sum(p.clicks) AS clicks,
       sum(p.conversions) AS conversions, clicks / sends AS ctr, conversions / sends AS cvr,
       loopcast_wilson_lower(clicks, sends) AS ctr_lower, loopcast_wilson_lower(conversions, sends) AS cvr_lower
FROM copy_performance AS p
INNER JOIN copy_library AS l FINAL
    ON l.template_id = p.template_id AND l.version = p.version AND l.campaign_id = p.campaign_id
   AND l.variant = p.variant
WHERE p.template_id != ''
  AND ({format:Nullable(String)} IS NULL OR l.channel_format = {format:Nullable(String)})
  AND ({trigger:Nullable(String)} IS NULL OR l.trigger_event = {trigger:Nullable(String)})
GROUP BY p.template_id
HAVING sends >= {min_sends:UInt64}
ORDER BY {order} DESC, sends DESC, template_id
LIMIT {limit:UInt32}
"""


def few_shot_examples(
    warehouse: Warehouse,
    *,
    channel_format: str | None = None,
    trigger_event: str | None = None,
    limit: int = 5,
    metric: Metric = "ctr",
    min_sends: int = MIN_SENDS,
) -> list[dict[str, Any]]:
    """The best copy sent, for the generator's prompt (the fields of streams.copy.generate.CopyExample and
    more): template_id, title, short_text (the template's body), long_text, cta,
    channel_format, trigger_event, source, sends, clicks, conversions, ctr, cvr, ctr_lower, cvr_lower.
    Ranked by the metric's lower bound, from the live views (always current, whether or not the job ran).
    `channel_format` (sms-cn, push-fcm, email …) keeps copy written for the same place; `trigger_event`
    copy sent on the same moment (cart_add, signup …) — the moment copy knows of: campaigns declare no
    warm-up / peak / long-tail phase, only the generator's brief does."""
    sql = _FEW_SHOT_SQL.replace("{order}", _LOWER[metric])
    parameters = {"format": channel_format, "trigger": trigger_event, "min_sends": min_sends, "limit": limit}
    return warehouse.query(sql, parameters)


def examples_for(
    warehouse: Warehouse, *, trigger_event: str | None = None, limit: int = 3, metric: Metric = "ctr"
) -> list[CopyExample]:
    """The generator's few-shot examples: the best copy sent on `trigger_event` (the campaign the copy is for),
    else the best copy of any campaign; none before anything has enough sends."""
    from streams.copy.generate import CopyExample

    rows = few_shot_examples(warehouse, trigger_event=trigger_event, limit=limit, metric=metric)
    if not rows and trigger_event is not None:
        rows = few_shot_examples(warehouse, limit=limit, metric=metric)
    return [CopyExample.model_validate(row) for row in rows]


_TEMPLATE_KNOWLEDGE_SQL = (
    "SELECT sends, clicks, conversions FROM copy_knowledge FINAL WHERE kind = 'template' AND item = {item:String}"
    " AND campaign_id = '' AND channel = {channel:String}"
)
_TEMPLATE_LIVE_SQL = (
    "SELECT sends, clicks, conversions FROM copy_template_ranking WHERE template_id = {item:String}"
    " AND channel = {channel:String}"
)
_TERMS_SQL = (
    "SELECT kind, item, sends, clicks, conversions FROM copy_knowledge FINAL WHERE kind IN ('keyword', 'phrase')"
    " AND campaign_id = '' AND channel = {channel:String} AND has({items:Array(String)}, item)"
)
# Before the job ran: the templates sent, with their literal copy, to count terms from here.
_TEMPLATES_LIVE_SQL = """
SELECT r.template_id AS template_id, r.sends AS sends, r.clicks AS clicks, r.conversions AS conversions, t.text AS text
FROM copy_template_ranking AS r
INNER JOIN
(
    SELECT template_id, argMax(text, (seen_at, version)) AS text FROM copy_library GROUP BY template_id
) AS t ON t.template_id = r.template_id
WHERE r.channel = {channel:String}
"""


def prior_for(
    warehouse: Warehouse,
    *,
    metric: Metric = "ctr",
    template_id: str | None = None,
    text: str | None = None,
    parts: dict[str, str | None] | None = None,
    channel: str = "",
    cap: int = PRIOR_CAP,
    min_sends: int = MIN_SENDS,
) -> BetaPrior:
    """A Beta prior for a new variant (CampaignVariant.prior), from the copy most like it, worth at most
    `cap` sends: the template's own record when it was sent before (copy_knowledge, else the live
    ranking), else the keywords and phrases it shares with copy already sent (their pooled rate, as much
    evidence as the best-supported of them, since one message counts under each of its terms; from
    copy_knowledge once the job ran, else counted here over the templates in the live ranking), else
    Beta(1, 1). `text` is literal copy; `parts` a template's parts (fields and tags are left out)."""
    successes = "clicks" if metric == "ctr" else "conversions"
    if template_id:
        parameters = {"item": template_id, "channel": channel}
        rows = warehouse.query(_TEMPLATE_KNOWLEDGE_SQL, parameters) or warehouse.query(_TEMPLATE_LIVE_SQL, parameters)
        if rows and rows[0]["sends"] >= min_sends:
            return beta_prior(rows[0][successes], rows[0]["sends"], cap=cap)
    wanted = sorted(item for _, item in terms((text or "") + "\n" + copy_text(parts or {})))
    if not wanted:
        return BetaPrior()
    (loaded,) = warehouse.query("SELECT count() AS n FROM copy_knowledge")
    if loaded["n"]:
        found = warehouse.query(_TERMS_SQL, {"channel": channel, "items": wanted})
    else:
        found = live_terms(warehouse.query(_TEMPLATES_LIVE_SQL, {"channel": channel}), set(wanted))
    rows = [r for r in found if r["sends"] >= min_sends]
    if not rows:
        return BetaPrior()
    rate = sum(r[successes] for r in rows) / sum(r["sends"] for r in rows)
    evidence = min(cap, max(r["sends"] for r in rows))
    return beta_prior(rate * evidence, evidence, cap=cap)


def live_terms(templates: Iterable[dict[str, Any]], wanted: set[str]) -> list[dict[str, Any]]:
    """The job's term counts (sends, clicks, conversions per keyword or phrase) for the `wanted` items, from
    templates' totals and literal copy: a term earns what every template using it earned."""
    totals: dict[str, dict[str, Any]] = defaultdict(lambda: {"sends": 0, "clicks": 0, "conversions": 0})
    for template in templates:
        for kind, item in terms(template["text"] or ""):
            if item in wanted:
                total = totals[item]
                total["kind"], total["item"] = kind, item
                for key in ("sends", "clicks", "conversions"):
                    total[key] += int(template[key])
    return list(totals.values())


# --------------------------------------------------------------------------------------------
# Insights: what people read (`loopcast copy insights`, the demo)


@dataclass
class Insights:
    kind: Kind
    origin: Literal["copy_knowledge", "live views"]
    rows: list[dict[str, Any]] = field(default_factory=list)
    updated_at: datetime | None = None  # when the job's output was loaded (copy_knowledge only)
    note: str = ""


_KNOWLEDGE_SQL = """
SELECT k.item AS item, k.templates AS templates, k.sends AS sends, k.clicks AS clicks,
       k.conversions AS conversions, k.ctr AS ctr, k.cvr AS cvr, k.ctr_lower AS ctr_lower,
       k.cvr_lower AS cvr_lower, b.body AS body, k.updated_at AS updated_at
FROM copy_knowledge AS k FINAL
LEFT JOIN
(
    SELECT template_id, argMax(body, (seen_at, version)) AS body FROM copy_library GROUP BY template_id
) AS b ON k.kind = 'template' AND b.template_id = k.item
WHERE k.kind = {kind:String} AND k.campaign_id = {campaign:String} AND k.channel = ''
ORDER BY {order} DESC, sends DESC, item
LIMIT {limit:UInt32}
"""
_LIVE_SQL = """
SELECT template_id AS item, uniqExact(template_id) AS templates, any(body) AS body,
       sum(sends) AS sends, sum(clicks) AS clicks, sum(conversions) AS conversions,
       clicks / sends AS ctr, conversions / sends AS cvr,
       loopcast_wilson_lower(clicks, sends) AS ctr_lower, loopcast_wilson_lower(conversions, sends) AS cvr_lower
FROM copy_performance
WHERE template_id != '' AND ({campaign:Nullable(String)} IS NULL OR campaign_id = {campaign:Nullable(String)})
GROUP BY template_id
ORDER BY {order} DESC, sends DESC, item
LIMIT {limit:UInt32}
"""


def insights(
    warehouse: Warehouse,
    *,
    kind: Kind = "template",
    campaign_id: str | None = None,
    limit: int = 10,
    metric: Metric = "ctr",
) -> Insights:
    """The top items of a kind, best lower bound first: from copy_knowledge once the job has loaded it,
    else (templates only) from the live views; keywords and phrases exist only as the job's output."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    order = _LOWER[metric]
    (loaded,) = warehouse.query("SELECT count() AS n, max(updated_at) AS at FROM copy_knowledge")
    if loaded["n"]:
        rows = warehouse.query(
            _KNOWLEDGE_SQL.replace("{order}", order), {"kind": kind, "campaign": campaign_id or "", "limit": limit}
        )
        for row in rows:
            row.pop("updated_at")
        return Insights(kind, "copy_knowledge", rows, loaded["at"])
    if kind != "template":
        note = "keywords and phrases come from the knowledge job: run `loopcast jobs run knowledge`"
        return Insights(kind, "live views", [], note=note)
    rows = warehouse.query(_LIVE_SQL.replace("{order}", order), {"campaign": campaign_id, "limit": limit})
    return Insights(kind, "live views", rows, note="the knowledge job has not run: templates from the live views")


def top_rows(warehouse: Warehouse, *, limit: int = 5, metric: Metric = "ctr") -> dict[Kind, Insights]:
    """The knowledge base's top rows of every kind, for the demo's closing summary."""
    return {kind: insights(warehouse, kind=kind, limit=limit, metric=metric) for kind in KINDS}
