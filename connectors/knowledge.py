"""Reading the copy knowledge base (infra/clickhouse/010_copy_knowledge.sql, jobs/knowledge.py): the best copy
as few-shot examples for the copy generator, Beta priors for new variants, the insights people read, and
recording copy into copy_library."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from streams.copy.knowledge import KINDS, MIN_SENDS, PRIOR_CAP, Kind, beta_prior, copy_text, library_rows, terms
from streams.copy.variants import BetaPrior, Metric

if TYPE_CHECKING:
    import redis

    from connectors.warehouse import Warehouse
    from schemas.config import Document

LIBRARY = "copy_library"
KNOWLEDGE = "copy_knowledge"
PRIOR_PREFIX = "knowledge:prior:"
# The ranking column per metric: the lower bound, so thin evidence does not rank first.
_LOWER = {"ctr": "ctr_lower", "cvr": "cvr_lower"}


def prior_key(template_id: str) -> str:
    """Redis: a template's bandit prior as JSON ({"ctr": {alpha, beta}, "cvr": {...}, "sends": n})."""
    return f"{PRIOR_PREFIX}{template_id}"


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
       any(l.cta) AS cta, any(l.channel_format) AS channel_format, any(l.trigger_event) AS phase,
       any(l.source) AS source, sum(p.sends) AS sends, sum(p.clicks) AS clicks,
       sum(p.conversions) AS conversions, clicks / sends AS ctr, conversions / sends AS cvr,
       loopcast_wilson_lower(clicks, sends) AS ctr_lower, loopcast_wilson_lower(conversions, sends) AS cvr_lower
FROM copy_performance AS p
INNER JOIN copy_library AS l FINAL
    ON l.template_id = p.template_id AND l.version = p.version AND l.campaign_id = p.campaign_id
   AND l.variant = p.variant
WHERE p.template_id != ''
  AND ({format:Nullable(String)} IS NULL OR l.channel_format = {format:Nullable(String)})
  AND ({phase:Nullable(String)} IS NULL OR l.trigger_event = {phase:Nullable(String)})
GROUP BY p.template_id
HAVING sends >= {min_sends:UInt64}
ORDER BY {order} DESC, sends DESC, template_id
LIMIT {limit:UInt32}
"""


def few_shot_examples(
    warehouse: Warehouse,
    *,
    channel_format: str | None = None,
    phase: str | None = None,
    limit: int = 5,
    metric: Metric = "ctr",
    min_sends: int = MIN_SENDS,
) -> list[dict[str, Any]]:
    """The best copy sent, for the generator's prompt (the fields of streams.copy.generate.CopyExample and
    more): template_id, title, short_text (the template's body), long_text, cta,
    channel_format, phase, source, sends, clicks, conversions, ctr, cvr, ctr_lower, cvr_lower. Ranked by
    the metric's lower bound, from the live views (always current, whether or not the job ran).
    `channel_format` (sms-cn, push-fcm, email …) keeps copy written for the same place; `phase` matches
    the trigger event of the campaign that sent it (cart_add, signup …): campaigns do not declare a
    warm-up / peak / long-tail phase (the generator's brief does), so that is the moment copy knows."""
    sql = _FEW_SHOT_SQL.replace("{order}", _LOWER[metric])
    parameters = {"format": channel_format, "phase": phase, "min_sends": min_sends, "limit": limit}
    return warehouse.query(sql, parameters)


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
    evidence as the best-supported of them, since one message counts under each of its terms), else
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
    rows = [r for r in warehouse.query(_TERMS_SQL, {"channel": channel, "items": wanted}) if r["sends"] >= min_sends]
    if not rows:
        return BetaPrior()
    rate = sum(r[successes] for r in rows) / sum(r["sends"] for r in rows)
    evidence = min(cap, max(r["sends"] for r in rows))
    return beta_prior(rate * evidence, evidence, cap=cap)


def bandit_priors(client: redis.Redis, template_ids: Sequence[str], metric: Metric) -> dict[str, BetaPrior]:
    """The priors the knowledge job wrote to Redis for these templates (those it found enough sends for)."""
    if not template_ids:
        return {}
    found: dict[str, BetaPrior] = {}
    for template_id, raw in zip(template_ids, client.mget([prior_key(t) for t in template_ids]), strict=True):
        if raw:
            found[template_id] = BetaPrior.model_validate(json.loads(raw)[metric])
    return found


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
