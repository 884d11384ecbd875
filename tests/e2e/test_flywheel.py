"""The flywheel on the real stack: copy written by the LLM sandbox joins a bandit campaign, shoppers click one
variant more through the tracked links, ClickHouse credits clicks and conversions per variant, the knowledge base
ranks the better copy first, the next generation's prompt carries it as a few-shot example, and the next
variants start the bandit from the priors similar copy earned."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from datetime import UTC, datetime

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from connectors import warehouse
from connectors.channels.sandboxes.core import Faults
from connectors.knowledge import examples_for
from connectors.state import State
from console.audience_cli import config_from_topic
from console.cli import app
from infra.waiting import wait_for
from schemas.config import Campaign, Channel, Template, Trigger
from schemas.models import Event
from streams.copy.knowledge import PRIOR_CAP
from streams.copy.variants import Experiment
from tests.e2e.stack_io import fire, fire_events, publish, received

pytestmark = pytest.mark.e2e

CAMPAIGN, TRIGGER, PAID = "fly-cart", "fly_cart", "fly_paid"
BRIEF = {
    "product": {"name": "Flywheel 保温杯", "price": "129", "selling_points": ["12 小时保温", "一键开盖"]},
    "campaign": {"goal": "召回加购用户", "phase": "peak", "offer": "满100减20", "tone": "亲切", "language": "zh"},
    "persona": "通勤上班族",
    "fields": ["name"],
    "channels": ["push-fcm"],
    "variants": 2,
}
# What simulated shoppers do with a message, by variant: the first generated copy is the one they like.
P_CLICK = {"gen-2-1": 0.6}
P_CLICK_OTHERS = 0.08
P_BUY_AFTER_CLICK = 0.5


def generate(settings, brief_path) -> dict:
    """`loopcast copy generate … --publish --campaign`, written by the stack's LLM sandbox."""
    env = {"LOOPCAST_LLM_BASE_URL": f"{settings.sandbox_base}/llm/v1"}
    args = ["copy", "generate", str(brief_path), "--publish", "--campaign", CAMPAIGN, "--format", "json"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def llm_requests(settings, offset: int = 0) -> list[dict]:
    url = f"{settings.sandbox_base}/_sandbox/llm/requests"
    return [i["body"] for i in httpx.get(url, params={"offset": offset, "limit": 100000}).json()["items"]]


def library_variants(wh) -> set[str]:
    rows = wh.query("SELECT DISTINCT variant FROM copy_library WHERE campaign_id = {c:String}", {"c": CAMPAIGN})
    return {r["variant"] for r in rows}


def bandit_shares(settings) -> dict[str, float]:
    async def go() -> dict:
        state = State(settings.redis)
        try:
            return (await state.ab_states([CAMPAIGN])).get(CAMPAIGN, {}).get("shares") or {}
        finally:
            await state.close()

    return asyncio.run(go())


def shop(settings, bodies: list[dict]) -> tuple[Counter, Counter]:
    """Click (a real GET of the tracked link) and pay, per message, as the variant's shoppers would."""
    clicks: Counter = Counter()
    purchases: list[Event] = []
    buys: Counter = Counter()
    with httpx.Client() as client:
        for body in bodies:
            roll = random.Random(f"flywheel:{body['message_id']}")
            if roll.random() >= P_CLICK.get(body["variant"], P_CLICK_OTHERS):
                continue
            assert client.get(body["link"], follow_redirects=False).status_code == 302
            clicks[body["variant"]] += 1
            if roll.random() < P_BUY_AFTER_CLICK:
                buys[body["variant"]] += 1
                purchases.append(
                    Event(
                        event_id=f"fly-order-{body['message_id']}",
                        event_type=PAID,
                        user_id=body["user_id"],
                        occurred_at=datetime.now(UTC),
                        properties={"amount": 129.0},
                    )
                )
    fire_events(settings, purchases)
    return clicks, buys


def test_generated_copy_competes_and_teaches_the_next_generation(worker, tmp_path) -> None:
    settings = worker
    sandbox = settings.sandbox_base
    httpx.post(f"{sandbox}/_sandbox/llm/faults", json=Faults().model_dump())  # good copy, no throttling
    hand = Template(
        id="fly-hand", title="购物车提醒", body="${name}，你的购物车还在等你", link="https://shop.example/fly"
    )
    documents = [
        Channel(id="fly-hook", provider="webhook", url=f"{sandbox}/webhook/fly", format="push-fcm"),
        hand,
        Campaign(
            id=CAMPAIGN,
            name="flywheel",
            trigger=Trigger(event_type=TRIGGER),
            channel="fly-hook",
            template_id=hand.id,
            experiment=Experiment(mode="bandit", fallback="a"),
            conversion_event=PAID,
        ),
    ]
    users = [f"fly-u{i:03d}" for i in range(150)]
    publish(settings, documents, [{"user_id": u, "name": f"顾客{u[-3:]}"} for u in users])
    brief = tmp_path / "brief.yaml"
    brief.write_text(yaml.safe_dump(BRIEF, allow_unicode=True))
    wh = warehouse.connect(settings)  # the worker's read-only endpoint
    try:
        # 1. The first generation, from the sandbox model, published beside the hand-written copy.
        first = generate(settings, brief)
        assert first["source"] == "llm:gpt-4o-mini" and len(first["accepted"]) == 2
        assert first["published"] == [
            f"template:{CAMPAIGN}.gen-2-1",
            f"template:{CAMPAIGN}.gen-2-2",
            "campaign:" + CAMPAIGN,
        ]
        titles = {f"gen-2-{c['variant'] + 1}": c["bundle"]["title"] for c in first["accepted"]}
        titles["a"] = hand.title
        # The worker owning the warehouse has read the new version when it records its copy.
        wait_for(
            lambda: library_variants(wh) >= {"a", "gen-2-1", "gen-2-2"},
            timeout_s=30,
            what="the generated variants' copy in copy_library",
        )

        # 2. They compete live: every variant reaches the provider with its own copy.
        fire(settings, TRIGGER, users)
        bodies = wait_for(
            lambda: (b := received(settings, "webhook", CAMPAIGN)) and len(b) >= len(users) and b,
            timeout_s=90,
            what=f"{len(users)} flywheel messages at the webhook sandbox",
        )
        sent = Counter(b["variant"] for b in bodies)
        assert set(sent) == {"a", "gen-2-1", "gen-2-2"} and sent["gen-2-1"] >= 30, sent
        assert all(b["title"] == titles[b["variant"]] for b in bodies)

        # 3. Shoppers like gen-2-1; ClickHouse credits every click and purchase to the variant that earned it.
        clicks, buys = shop(settings, bodies)
        assert clicks["gen-2-1"] > 2 * max(clicks["a"], clicks["gen-2-2"]) and buys["gen-2-1"] > 0

        def funnel() -> dict | None:
            rows = wh.query(
                "SELECT variant, sent, clicked, converted FROM variant_funnel WHERE campaign_id = {c:String}",
                {"c": CAMPAIGN},
            )
            found = {r["variant"]: (int(r["sent"]), int(r["clicked"]), int(r["converted"])) for r in rows}
            wanted = {v: (n, clicks[v], buys[v]) for v, n in sent.items()}
            return found if found == wanted else None

        wait_for(funnel, timeout_s=60, interval_s=1, what="clicks and conversions per variant in ClickHouse")

        # 4. The knowledge base ranks the better copy first, from the live views.
        ranked = wh.query(
            "SELECT variant, template_id, source FROM copy_performance WHERE campaign_id = {c:String}"
            " ORDER BY ctr_lower DESC",
            {"c": CAMPAIGN},
        )
        assert [r["variant"] for r in ranked][0] == "gen-2-1"
        assert ranked[0]["template_id"] == f"{CAMPAIGN}.gen-2-1" and ranked[0]["source"] == "llm:gpt-4o-mini"
        best = examples_for(wh, trigger_event=TRIGGER)[0]
        liked = next(c["bundle"] for c in first["accepted"] if c["variant"] == 0)
        assert best.short_text == liked["short_text"] and best.ctr == pytest.approx(clicks["gen-2-1"] / sent["gen-2-1"])

        # 5. The next generation learns from it: the best copy is a few-shot example in every request it makes.
        before = len(llm_requests(settings))
        second = generate(settings, brief)
        assert second["examples"][0]["short_text"] == liked["short_text"]
        requests = llm_requests(settings, offset=before)
        assert len(requests) >= 2
        quoted = json.dumps(liked["short_text"], ensure_ascii=False)
        for request in requests:
            prompt = "\n".join(m["content"] for m in request["messages"] if m["role"] == "user")
            assert "performed best before" in prompt and quoted in prompt

        # 6. …and its variants start the bandit where similar copy left off: the twin of the liked copy ahead.
        campaign = asyncio.run(config_from_topic(settings)).campaign(CAMPAIGN)
        priors = {v.id: v.prior for v in campaign.variants}
        assert set(priors) == {"a", "gen-3-1", "gen-3-2"} and priors["a"] is None
        for variant in ("gen-3-1", "gen-3-2"):
            assert 2 < priors[variant].alpha + priors[variant].beta <= PRIOR_CAP + 2
        mean = {v: p.alpha / (p.alpha + p.beta) for v, p in priors.items() if p is not None}
        assert mean["gen-3-1"] > mean["gen-3-2"]
    finally:
        wh.close()
    shares = wait_for(
        lambda: (s := bandit_shares(settings)) and set(s) == {"a", "gen-3-1", "gen-3-2"} and s,
        timeout_s=30,
        what="bandit shares over the new variants",
    )
    assert max(shares, key=shares.get) == "gen-3-1", shares
    wave = [f"fly-v{i:03d}" for i in range(40)]
    publish(settings, profiles=[{"user_id": u, "name": f"顾客{u[-3:]}"} for u in wave])
    fire(settings, TRIGGER, wave)
    later = wait_for(
        lambda: (b := received(settings, "webhook", CAMPAIGN)) and len(b) >= len(users) + len(wave) and b,
        timeout_s=90,
        what="the second wave at the webhook sandbox",
    )
    again = Counter(b["variant"] for b in later[len(users) :])
    assert set(again) <= {"a", "gen-3-1", "gen-3-2"} and again.most_common(1)[0][0] == "gen-3-1", again
