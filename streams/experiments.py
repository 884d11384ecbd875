"""The A/B loop: per-variant stats from ClickHouse → a decision → Redis (what render reads) and
ClickHouse (the decision log); once a winner is known, messages held for it are released. Before the
stats, the copy each variant sends goes into copy_library, which the knowledge base's views rank.

It runs in the worker that owns the warehouse, on a timer; the decision rule itself is pure
(streams.copy.variants) and can be checked on any numbers with `loopcast ab decide`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime

from connectors.knowledge import LIBRARY
from infra import topics
from schemas.config import Campaign, Channel, Document, Template
from schemas.contracts import codec
from schemas.models import MatchedMessage, now_utc
from streams.copy.knowledge import library_rows
from streams.copy.variants import Decision, VariantStats, decide, thompson_shares

log = logging.getLogger("loopcast.experiments")
matched = codec(MatchedMessage)

STATS_SQL = "SELECT variant, sent, clicked, converted FROM variant_funnel WHERE campaign_id = {campaign:String}"
# A decision whose status did not change is logged again only when its numbers moved, and at most
# this often: the log shows progress without a row per tick.
RELOG_EVERY_S = 10.0


def experimenting(campaigns: list[Campaign]) -> list[Campaign]:
    return [c for c in campaigns if c.status == "active" and c.experiment is not None and len(c.variants) >= 2]


def new_library_rows(documents: list[Document], recorded: set[tuple], now: datetime) -> list[dict]:
    """copy_library rows for these documents' copy that are not among `recorded` (rows without seen_at)."""
    rows = library_rows(documents, now)
    return [r for r in rows if library_key(r) not in recorded]


def library_key(row: dict) -> tuple:
    return tuple(v for k, v in row.items() if k != "seen_at")


def variant_stats(campaign: Campaign, rows: list[dict]) -> list[VariantStats]:
    by_variant = {row["variant"]: row for row in rows}
    return [
        VariantStats(
            variant=v.id,
            exposures=int(by_variant.get(v.id, {}).get("sent") or 0),
            clicks=int(by_variant.get(v.id, {}).get("clicked") or 0),
            conversions=int(by_variant.get(v.id, {}).get("converted") or 0),
        )
        for v in campaign.variants
    ]


def evaluate(campaign: Campaign, stats: list[VariantStats], now: datetime) -> tuple[Decision, dict]:
    """The decision and the state render will read (pure). Variants' priors shape only the bandit's shares."""
    experiment = campaign.experiment
    deadline_passed = campaign.decide_by is not None and now >= campaign.decide_by
    decision = decide(stats, experiment, deadline_passed=deadline_passed)
    state = {
        "status": decision.status,
        "winner": decision.winner,
        "probabilities": decision.probabilities,
        "decided_at": now.isoformat(),
    }
    if experiment.mode == "bandit" and decision.status == "continue":
        priors = {v.id: v.prior for v in campaign.variants if v.prior is not None}
        state["shares"] = thompson_shares(stats, experiment.metric, priors=priors)
    return decision, state


def decision_row(campaign: Campaign, decision: Decision, now: datetime) -> dict:
    return {
        "campaign_id": campaign.id,
        "decided_at": now,
        "status": decision.status,
        "winner": decision.winner,
        "metric": campaign.experiment.metric,
        "samples": decision.samples,
        "probabilities": json.dumps(decision.probabilities),
        "reason": decision.reason,
    }


class ExperimentLoop:
    def __init__(self, rt, interval_s: float) -> None:
        self.rt = rt
        self.interval_s = interval_s
        self._logged: dict[str, tuple[str, str | None, int, float]] = {}
        # The copy documents last recorded (by key; a new version is a new object) and the rows written.
        self._copy_seen: dict[str, Document] = {}
        self._recorded: set[tuple] = set()

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the loop must outlive a bad tick (a query error, Redis blip)
                log.exception("A/B evaluation failed; retrying next tick")
            await asyncio.sleep(self.interval_s)  # a schedule, not synchronisation

    async def tick(self) -> None:
        await self.record_copy()
        campaigns = experimenting([d for d in self.rt.config.documents.values() if isinstance(d, Campaign)])
        if not campaigns:
            return
        states = await self.rt.user_state.ab_states([c.id for c in campaigns])
        for campaign in campaigns:
            current = states.get(campaign.id, {})
            if current.get("status") in ("winner", "fallback"):
                await self.release(campaign)
                continue
            rows = await asyncio.to_thread(self.rt.warehouse.query, STATS_SQL, {"campaign": campaign.id})
            now = now_utc()
            decision, state = evaluate(campaign, variant_stats(campaign, rows), now)
            await self.rt.user_state.set_ab_state(campaign.id, state)
            await self.log_decision(campaign, decision, now)
            if decision.status != "continue":
                log.info("A/B %s: %s %s (%s)", campaign.id, decision.status, decision.winner, decision.reason)
                await self.release(campaign)

    async def record_copy(self) -> int:
        """The copy on the config topic into copy_library when a campaign, template or channel changed: copy is
        published there (by people and by `loopcast copy generate --publish`), and this process owns the
        warehouse. A row recorded again would collapse on its key anyway; only new ones are written."""
        documents = [d for d in self.rt.config.documents.values() if isinstance(d, Campaign | Template | Channel)]
        if len(documents) == len(self._copy_seen) and all(self._copy_seen.get(d.key) is d for d in documents):
            return 0
        rows = new_library_rows(documents, self._recorded, now_utc())
        if rows:
            await asyncio.to_thread(self.rt.warehouse.insert, LIBRARY, rows)
            self._recorded.update(library_key(r) for r in rows)
        self._copy_seen = {d.key: d for d in documents}
        return len(rows)

    async def log_decision(self, campaign: Campaign, decision: Decision, now: datetime) -> None:
        key = (decision.status, decision.winner)
        last = self._logged.get(campaign.id)
        if last and last[:2] == key and (last[2] == decision.samples or now.timestamp() - last[3] < RELOG_EVERY_S):
            return
        await asyncio.to_thread(self.rt.warehouse.insert, "ab_decisions", [decision_row(campaign, decision, now)])
        self._logged[campaign.id] = (*key, decision.samples, now.timestamp())

    async def release(self, campaign: Campaign) -> int:
        """Held messages go back to loopcast.matched; render now assigns them the winner."""
        released = 0
        while batch := await self.rt.user_state.peek_held(campaign.id):
            # Keyed by user again, so the message lands on the same partition as the rest of its user's.
            futures = [
                await self.rt.producer.send(topics.MATCHED.name, raw, key=matched.decode(raw).user_id.encode())
                for raw in batch
            ]
            await asyncio.gather(*futures)
            await self.rt.user_state.drop_held(campaign.id, len(batch))
            released += len(batch)
        if released:
            log.info("A/B %s: released %d held messages", campaign.id, released)
        return released
