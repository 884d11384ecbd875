"""The e-commerce demo: a small shop, its promotion in three phases, shoppers who react, an alert.

Every phase's copy is generated from a brief (by the LLM endpoint configured, else the stack's own LLM
sandbox), checked, and tested by a bandit beside the hand-written copy. Warm-up: claiming a coupon tags a
shopper price-sensitive (a tag rule); adding to cart then brings a preview into the in-app inbox of the
price-sensitive segment. Peak: the cart reminder, and "only N left" to a product's carters as its live
stock falls past each threshold (stock_changed). Long tail: unpaid orders hear their discount is extended 24h.

Shoppers act only on what really reached the provider sandbox: they open the tracked link (a real HTTP
click through Loopcast's redirect) and some pay, which Loopcast attributes back to the message. The funnel
is read from ClickHouse; the copy then goes into the knowledge base with what it earned; last, a provider
fails and the delivery-rate monitor's alert reaches the operators' channel.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from connectors import warehouse
from connectors.kafka import produce, produce_raw
from connectors.state import State
from console.alert_demo import ProviderFailure, show_delivery_alert
from console.copy_cli import generate_copy, print_insights
from console.peak import PEAK, THRESHOLDS, cart_event, live_inventory, loop_idle, peak_documents, stock_event
from console.reports import funnel_report, print_funnel
from console.services import INFRA, stack
from infra import topics
from infra.settings import Settings
from infra.stack import read_pid_file
from infra.waiting import wait_for
from schemas.config import (
    Audience,
    Campaign,
    CampaignVariant,
    Channel,
    Document,
    SegmentDocument,
    TagRule,
    Template,
    Trigger,
)
from schemas.models import Alert, Event, Priority
from streams.copy.generate import CopyBrief, GenerationResult, to_template, with_generated_variants
from streams.copy.variants import Experiment
from streams.policy import QuietHours

CART = "cart-abandon"
UNPAID = "unpaid-order"
WARMUP = "warmup-preview"
CAMPAIGNS = (CART, UNPAID)
FIRST_NAMES = ["Lin", "Wei", "Mei", "Jun", "Ana", "Sam", "Yuki", "Omar", "Lea", "Ravi", "小红", "明"]
CITIES = ["Shanghai", "Hangzhou", "Shenzhen", "Berlin", "Austin", "Osaka"]
PRODUCTS = [
    ("p-100", "Wireless earbuds", 299.0),
    ("p-101", "Trail running shoes", 459.0),
    ("p-102", "Pour-over coffee kit", 189.0),
    ("p-103", "Mechanical keyboard", 699.0),
    ("p-104", "Anime figure (limited)", 899.0),
]


@dataclass
class Shop:
    profiles: list[dict]
    stock: dict[str, int]


@dataclass
class Shoppers:
    """Click and purchase behaviour, deterministic per message so a rerun tells the same story."""

    seed: int
    run: str = ""  # this run's user id prefix: shoppers act on their own messages only
    # True click rates per copy variant: the A/B test is there to find out which is better.
    p_click: dict[str | None, float] = field(default_factory=lambda: {"scarcity": 0.28, "discount": 0.40, None: 0.35})
    p_buy_after_click: float = 0.45
    seen: set[str] = field(default_factory=set)
    clicks: int = 0
    purchases: int = 0
    # Conversions are credited to each buyer's last message, so converted messages = buyers.
    buyers: set[str] = field(default_factory=set)

    def roll(self, message_id: str, what: str) -> float:
        return random.Random(f"{self.seed}:{message_id}:{what}").random()


def make_shop(users: int, seed: int, run: str) -> Shop:
    """Shoppers of this run: their behaviour follows the seed, their ids are new each run, so a
    rerun on a stack that still holds earlier runs (caps, dedup claims, funnels) tells the story anew."""
    rng = random.Random(seed)
    profiles = []
    for i in range(users):
        profile = {
            "user_id": f"{run}-u{i:05d}",
            "city": rng.choice(CITIES),
            "vip_level": rng.choice([0, 0, 1, 2, 3]),
            "tags": rng.sample(["price_sensitive", "anime_fan", "full_price_preference", "night_owl"], k=2),
        }
        # A few profiles lack a name: the template needs one, so those messages end render_failed.
        if rng.random() > 0.03:
            profile["name"] = rng.choice(FIRST_NAMES)
        profiles.append(profile)
    return Shop(profiles=profiles, stock={pid: rng.randint(3, 40) for pid, _, _ in PRODUCTS})


def documents(settings: Settings) -> list:
    # The sandbox stands in for the shop app's push relay: the webhook provider, app-push format rules.
    link = "https://shop.example/p/${product_id}?utm_campaign=cart-abandon"
    return [
        # Warm-up: behaviour tags shoppers (data, not code), a segment selects them, the inbox previews.
        TagRule(id="coupon-claimed", event_type="coupon_claimed", add=["price_sensitive"]),
        SegmentDocument(
            id="price-sensitive", name="Price-sensitive shoppers", root={"type": "has_tag", "tag": "price_sensitive"}
        ),
        Channel(id="shop-inbox", provider="inbox", format="inbox", brand="Loopshop"),
        Template(
            id="warmup-preview",
            title="Preview: ${product_name} in the sale",
            body='${name!"Hi"}, ${product_name} from your cart joins tomorrow\'s sale at ¥${price}.',
        ),
        Campaign(
            id=WARMUP,
            name="Warm-up: sale preview for price-sensitive shoppers",
            trigger=Trigger(event_type="cart_add"),
            audience=Audience(kind="segment", segment_id="price-sensitive"),
            channel="shop-inbox",
            template_id="warmup-preview",
            quiet_hours=QuietHours(enabled=False),
            daily_cap=3,
        ),
        Channel(
            id="shop-app",
            provider="webhook",
            url=f"{settings.sandbox_base}/webhook/shop-app",
            format="push-fcm",
            brand="Loopshop",
        ),
        # Peak season: scarcity from live inventory, against a discount, as a Thompson-sampling bandit.
        Template(
            id="cart-scarcity",
            title="${name}, only ${stock} left",
            body="${product_name} is still in your cart<#if stock < 10> — only ${stock} left at ¥${price}</#if>.",
            link=link,
            cta="Check out",
        ),
        Template(
            id="cart-discount",
            title='${name!"Hi"}, 10% off today',
            body="Check out ${product_name} today and save 10%<#if vip_level gte 2> (VIP: 15%)</#if>.",
            link=link,
            cta="Check out",
        ),
        # Long tail: an unpaid order gets its discount extended.
        Template(
            id="unpaid-extended",
            title="Your discount is extended 24h",
            body="${name}, your order of ${product_name} is waiting: the discount holds for 24 more hours.",
            link="https://shop.example/orders/${order_id}",
            cta="Pay now",
        ),
        Campaign(
            id=CART,
            name="Cart abandonment reminder",
            trigger=Trigger(event_type="cart_abandoned"),
            channel="shop-app",
            variants=[
                CampaignVariant(id="scarcity", template_id="cart-scarcity"),
                CampaignVariant(id="discount", template_id="cart-discount"),
            ],
            experiment=Experiment(mode="bandit", metric="ctr", fallback="scarcity"),
            priority=Priority.normal,
            # A demo must show sends at whatever hour it runs; real campaigns keep quiet hours.
            quiet_hours=QuietHours(enabled=False),
            daily_cap=2,
            conversion_event="order_paid",
            attribution_window_hours=24,
        ),
        Campaign(
            id=UNPAID,
            name="Unpaid order: discount extended",
            trigger=Trigger(event_type="order_unpaid"),
            channel="shop-app",
            template_id="unpaid-extended",
            priority=Priority.high,
            quiet_hours=QuietHours(enabled=False),
            conversion_event="order_paid",
            attribution_window_hours=24,
        ),
    ]


def warmup_events(shop: Shop, seed: int) -> tuple[list[Event], int]:
    """Some shoppers claim a coupon (and become price-sensitive), then add to cart; returns the
    events and how many cart adds come from price-sensitive shoppers (the previews owed)."""
    rng = random.Random(seed + 2)
    now = datetime.now(UTC)
    events, owed = [], 0
    for profile in shop.profiles:
        user_id = profile["user_id"]
        coupon = rng.random() < 0.4
        if coupon:
            events.append(
                Event(event_id=f"coupon-{user_id}", event_type="coupon_claimed", user_id=user_id, occurred_at=now)
            )
        if rng.random() < 0.5:
            product_id, name, price = rng.choice(PRODUCTS)
            events.append(
                Event(
                    event_id=f"add-{user_id}", event_type="cart_add", user_id=user_id, occurred_at=now,
                    properties={"product_id": product_id, "product_name": name, "price": price},
                )
            )  # fmt: skip
            owed += coupon
    return events, owed


def trigger_events(shop: Shop, seed: int) -> list[Event]:
    rng = random.Random(seed + 1)
    now = datetime.now(UTC)
    events = []
    for profile in shop.profiles:
        # Most shoppers abandon one cart; some abandon three, and the daily cap of 2 stops the third.
        for n in range(rng.choices([0, 1, 3], weights=[25, 65, 10])[0]):
            product_id, name, price = rng.choice(PRODUCTS)
            events.append(
                Event(
                    event_id=f"cart-{profile['user_id']}-{n}",
                    event_type="cart_abandoned",
                    user_id=profile["user_id"],
                    occurred_at=now,
                    properties={
                        "product_id": product_id,
                        "product_name": name,
                        "price": price,
                        "stock": shop.stock[product_id],
                    },
                )
            )
    # The long tail: some shoppers left an order unpaid.
    for profile in shop.profiles:
        if rng.random() < 0.12:
            product_id, name, _ = rng.choice(PRODUCTS)
            events.append(
                Event(
                    event_id=f"unpaid-{profile['user_id']}",
                    event_type="order_unpaid",
                    user_id=profile["user_id"],
                    occurred_at=now,
                    properties={"product_id": product_id, "product_name": name, "order_id": f"o-{profile['user_id']}"},
                )
            )
    return events


MALFORMED = [b"{not json", b'{"event_type": "cart_abandoned"}', b"\xc3\x01garbage-after-magic"]


async def react(settings: Settings, shoppers: Shoppers, client: httpx.AsyncClient) -> None:
    """One pass over what the sandbox received and has receipted as delivered."""
    offset = 0
    while True:
        page = (
            await client.get(
                f"{settings.sandbox_base}/_sandbox/webhook/requests", params={"offset": offset, "limit": 1000}
            )
        ).json()
        items = page["items"]
        if not items:
            return
        offset += len(items)
        purchases = []
        for item in items:
            body, message_id = item["body"], item["body"]["message_id"]
            if body.get("campaign_id") not in CAMPAIGNS or not str(body.get("user_id", "")).startswith(shoppers.run):
                continue
            if item["receipt_status"] != "delivered" or message_id in shoppers.seen or not body.get("link"):
                continue
            shoppers.seen.add(message_id)
            if shoppers.roll(message_id, "click") < shoppers.p_click.get(body.get("variant"), 0.35):
                response = await client.get(body["link"], follow_redirects=False)
                if response.status_code == 302:
                    shoppers.clicks += 1
                    if shoppers.roll(message_id, "buy") < shoppers.p_buy_after_click:
                        purchases.append(
                            Event(
                                event_id=f"order-{message_id}",
                                event_type="order_paid",
                                user_id=body["user_id"],
                                occurred_at=datetime.now(UTC),
                                properties={"amount": 299.0},
                            )
                        )
        if purchases:
            shoppers.purchases += len(purchases)
            shoppers.buyers |= {e.user_id for e in purchases}
            await produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in purchases])


DECISION_AFTER_SQL = "SELECT 1 FROM ab_decisions WHERE campaign_id = {campaign:String} AND samples > 0 LIMIT 1"


FUNNEL_KEYS = ("targeted", "sent", "delivered", "undelivered", "clicked", "converted")


def totals(wh, campaigns: tuple[str, ...] = CAMPAIGNS, since: dict | None = None) -> dict:
    """The demo's campaigns added up, minus what earlier runs left (`since`): what the waits compare."""
    rows = [r for r in warehouse.funnel(wh) if r["campaign_id"] in campaigns]
    now = {k: sum(int(r.get(k) or 0) for r in rows) for k in FUNNEL_KEYS}
    return {k: v - (since or {}).get(k, 0) for k, v in now.items()}


# --- settings: the LLM and the monitor the demo runs with -------------------------------------------------------

LLM_SANDBOX_MODEL = "loopcast-sandbox"
# The e2e tests' windows: a drop shows within seconds instead of the production minute. Only what the person
# did not set; they apply to the worker this demo starts (a worker already running keeps its own).
DEMO_MONITOR = {
    "monitor_bucket_s": 1.0,
    "monitor_window_s": 10.0,
    "monitor_baseline_s": 60.0,
    "monitor_min_samples": 20,
    "monitor_min_baseline_samples": 50,
    "monitor_recover_s": 10.0,
}


def demo_settings(settings: Settings) -> Settings:
    """The stack's own LLM sandbox unless LOOPCAST_LLM_BASE_URL names an endpoint, and the demo's monitor
    windows for what the person left at its default."""
    update: dict = {k: v for k, v in DEMO_MONITOR.items() if k not in settings.model_fields_set}
    if not settings.llm_base_url:
        update["llm_base_url"] = f"{settings.sandbox_base}/llm/v1"
        if "llm_model" not in settings.model_fields_set:
            update["llm_model"] = LLM_SANDBOX_MODEL
    return settings.model_copy(update=update)


def uses_llm_sandbox(settings: Settings) -> bool:
    return bool(settings.llm_base_url) and settings.llm_base_url.startswith(f"{settings.sandbox_base}/llm/")


# --- copy per phase ----------------------------------------------------------------------------------------------

# What the generated copy is for, per campaign: the phase, the offer, who reads it and the fields the campaign's
# events and profiles fill in. Campaigns that cover every product are briefed on the sale, not one product.
SALE = {"name": "Loopshop 11.11 sale", "selling_points": ["free returns", "ships today"]}
BRIEFS: dict[str, dict] = {
    WARMUP: {
        "product": SALE,
        "campaign": {"goal": "preview the sale to price-sensitive shoppers", "phase": "warm-up",
                     "offer": "early prices for your cart"},
        "persona": "Shoppers who claimed a coupon and watch prices.",
        "fields": ["name", "product_name", "price"],
        "channels": ["inbox"],
        "variants": 2,
    },
    CART: {
        "product": SALE,
        "campaign": {"goal": "bring abandoned carts back", "phase": "peak"},
        "persona": "Shoppers who left something in their cart during the sale.",
        "fields": ["name", "product_name", "stock"],
        "channels": ["push-fcm"],
        "variants": 2,
    },
    PEAK: {
        "product": {"name": "Anime figure (limited)", "price": "899", "selling_points": ["numbered edition"]},
        "campaign": {"goal": "tell carters the figure is nearly gone", "phase": "peak"},
        "persona": "Collectors who carted the limited figure.",
        "fields": ["name", "product_name", "stock"],
        "channels": ["push-fcm"],
        "variants": 2,
    },
    UNPAID: {
        "product": SALE,
        "campaign": {"goal": "get unpaid orders paid", "phase": "long-tail", "offer": "discount extended 24h"},
        "persona": "Shoppers who placed an order and did not pay.",
        "fields": ["name", "product_name"],
        "channels": ["push-fcm"],
        "variants": 1,
    },
}  # fmt: skip
PHASE_OF = {WARMUP: "warm-up", CART: "peak", PEAK: "peak", UNPAID: "long tail"}


@dataclass
class PhaseCopy:
    campaign_id: str
    result: GenerationResult
    templates: list[Template]


def brief_for(campaign_id: str) -> CopyBrief:
    spec = BRIEFS[campaign_id]
    return CopyBrief.model_validate({**spec, "campaign": {"language": "en", **spec["campaign"]}, "brand": "Loopshop"})


def with_generated_copy(documents: list, copies: dict[str, GenerationResult]) -> tuple[list, list[PhaseCopy]]:
    """The documents with each campaign's generated copy as templates, tested by a bandit beside its
    hand-written copy; a campaign whose copy all failed the checks keeps its hand-written copy alone."""
    templates = {d.id: d for d in documents if isinstance(d, Template)}
    out, phases = [], []
    for document in documents:
        result = copies.get(document.id) if isinstance(document, Campaign) else None
        if result is None or not result.accepted:
            out.append(document)
            continue
        hand = templates[document.template_id or document.variants[0].template_id]
        generated = [
            to_template(c.bundle, f"{document.id}.gen-{i + 1}", link=hand.link, version=document.version + 1,
                        source=result.source)
            for i, c in enumerate(result.accepted)
        ]  # fmt: skip
        campaign = document
        if campaign.experiment is None or campaign.experiment.mode != "bandit":
            campaign = campaign.model_copy(update={"experiment": Experiment(mode="bandit", metric="ctr", fallback="a")})
        out += [*generated, with_generated_variants(campaign, [t.id for t in generated])]
        phases.append(PhaseCopy(document.id, result, generated))
    return out, phases


def generate_phase_copy(settings: Settings, console: Console) -> dict[str, GenerationResult]:
    async def all_phases() -> dict[str, GenerationResult]:
        results = {}
        for campaign_id in BRIEFS:
            label = f"{PHASE_OF[campaign_id]} ({campaign_id}) "
            results[campaign_id] = await generate_copy(brief_for(campaign_id), settings, True, out=console, label=label)
        return results

    return asyncio.run(all_phases())


def print_copies(console: Console, phases: list[PhaseCopy], documents: list) -> None:
    table = Table(title="Generated copy per phase (checked, then A/B-tested beside the hand-written copy)")
    for column in ("phase · campaign", "variant", "title", "short text", "source", "attempts"):
        table.add_column(column, ratio=3 if column == "short text" else None)
    variants = {v.template_id: v.id for d in documents if isinstance(d, Campaign) for v in d.variants}
    for phase in phases:
        for copy, template in zip(phase.result.accepted, phase.templates, strict=True):
            rejected = [r for r in phase.result.rejected if r.variant == copy.variant]
            table.add_row(
                f"{PHASE_OF[phase.campaign_id]} · {phase.campaign_id}", variants.get(template.id, template.id),
                Text(template.title or ""), Text(template.body), phase.result.source,
                f"{copy.attempts} ({len(rejected)} rejected)",
            )  # fmt: skip
    console.print(table)
    reasons = [r.problems[0] for p in phases for r in p.result.rejected]
    if reasons:
        console.print(f"[dim]{len(reasons)} answers refused by the checks, e.g.: " + "; ".join(
            dict.fromkeys(escape(r[:70]) for r in reasons[:3])) + "[/]")  # fmt: skip


# --- the peak: "only N left" from live inventory -------------------------------------------------------------------

PEAK_PRODUCT = PRODUCTS[4]
# The stock as the sale sells it: past 20, 10, 5 and 3 (one push each), then sold out (none).
STOCK_STEPS = (30, 18, 9, 4, 2, 0)


@dataclass
class Peak:
    product_id: str
    carters: list[str]
    payers: list[str]
    others: list[str]

    @property
    def users(self) -> list[str]:
        return [*self.carters, *self.payers, *self.others]


def make_peak(run: str, users: int) -> Peak:
    """This run's carters of the limited product (a product id of their own, so earlier runs' carts stay out),
    two who pay for it (order_paid takes them out of the cart) and one who never carted it."""
    ids = [f"{run}-peak{i:03d}" for i in range(max(6, users // 10) + 3)]
    return Peak(product_id=f"{PEAK_PRODUCT[0]}-{run}", carters=ids[:-3], payers=ids[-3:-1], others=ids[-1:])


def peak_campaign_documents(peak: Peak) -> list[Document]:
    # The peak campaign hears every product's stock: it is this run's, for this run's shoppers.
    return peak_documents("shop-app", campaign_id=PEAK, audience=Audience(kind="users", user_ids=peak.users))


def peak_pushes(settings: Settings, run: str) -> list[dict]:
    """The "only N left" pushes of this run that reached the shop app's push relay (the sandbox)."""
    url = f"{settings.sandbox_base}/_sandbox/webhook/requests"
    items = httpx.get(url, params={"limit": 1_000_000}, timeout=30).json()["items"]
    return [
        i["body"] for i in items
        if i["body"].get("campaign_id") == PEAK and str(i["body"].get("user_id", "")).startswith(run)
    ]  # fmt: skip


def run_peak(settings: Settings, console: Console, peak: Peak, run: str, progress: Progress) -> dict:
    product_id, name, price = peak.product_id, PEAK_PRODUCT[1], PEAK_PRODUCT[2]

    def stock(n: int, step: int) -> Event:
        return stock_event(product_id, n, product_name=name, price=price, event_id=f"{product_id}-s{step}")

    carts = [cart_event(u, product_id) for u in [*peak.carters, *peak.payers]]
    paid = [cart_event(u, product_id, "order_paid", amount=price) for u in peak.payers]
    asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in [stock(STOCK_STEPS[0], 0)]]))
    asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in carts + paid]))
    task = progress.add_task(f"peak: {len(peak.carters)} carts and stock {STOCK_STEPS[0]} in Redis", total=None)
    wait_for(
        lambda: live_inventory(settings, product_id) == (set(peak.carters), STOCK_STEPS[0]),
        timeout_s=90, interval_s=0.3, what="the carts and the stock in Redis",
    )  # fmt: skip
    progress.update(task, total=1, completed=1)
    per_step: list[dict] = []
    owed = len(peak.carters)  # every carter, at every threshold
    for step, n in enumerate(STOCK_STEPS[1:], start=1):
        crossed = [t for t in THRESHOLDS if n <= t < STOCK_STEPS[step - 1]]
        before = len(peak_pushes(settings, run))
        asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(product_id, stock(n, step))]))
        if n == 0:
            break
        task = progress.add_task(f"peak: stock {n} (past {min(crossed)}), pushes", total=owed)

        def arrived(task=task, before=before) -> list[dict]:
            pushes = peak_pushes(settings, run)[before:]
            progress.update(task, completed=len(pushes))
            return pushes if len(pushes) >= owed else []

        pushes = wait_for(arrived, timeout_s=90, interval_s=0.3, what=f"{owed} pushes at stock {n}")
        live = sum(1 for b in pushes if re.search(rf"\b{n}\b", f"{b.get('title')} {b.get('body')}"))
        users = {b["user_id"] for b in pushes}
        per_step.append({"threshold": min(crossed), "stock": n, "pushes": len(pushes), "users": len(users),
                         "live_number": live, "carters": users <= set(peak.carters)})  # fmt: skip
    task = progress.add_task("peak: sold out, the loop draining", total=None)
    sent_before = len(peak_pushes(settings, run))
    wait_for(lambda: live_inventory(settings, product_id)[1] == 0, timeout_s=60, what="the sell-out in Redis")
    wait_for(lambda: loop_idle(settings), timeout_s=120, interval_s=0.5, what="the loop to be idle")
    progress.update(task, total=1, completed=1)
    after = len(peak_pushes(settings, run)) - sent_before
    return {"steps": per_step, "after_sold_out": after, "carters": len(peak.carters), "payers": len(peak.payers)}


def print_peak(console: Console, peak: dict, stored: int) -> None:
    table = Table(title=f'Peak: "only N left" to {peak["carters"]} carters (live stock from stock_changed)')
    for column in ("threshold", "stock", "pushes", "carters reached", "live number in copy"):
        table.add_column(column, justify="right")
    for row in peak["steps"]:
        table.add_row(str(row["threshold"]), str(row["stock"]), str(row["pushes"]), str(row["users"]),
                      f"{row['live_number']}/{row['pushes']}")  # fmt: skip
    console.print(table)
    console.print(
        f"peak: {peak['payers']} shoppers paid before the drop (out of the cart: no push); sold out → "
        f"{peak['after_sold_out']} pushes after the sell-out; {stored} 'sent' outcomes in ClickHouse for "
        f"{sum(r['pushes'] for r in peak['steps'])} pushes at the sandbox"
    )


# --- the alert --------------------------------------------------------------------------------------------------


def run_alert(settings: Settings, console: Console, run: str, progress: Progress) -> tuple[Alert, float, bool]:
    """Fail a provider under steady traffic until the monitor's drop alert arrives: (alert, seconds after the
    failure, whether the operators' channel got it)."""
    scenario = ProviderFailure(settings, prefix=f"alert-{run}")
    scenario.heal()
    scenario.faults(error_rate=0.0)  # the shop's own faults off: the baseline is the channel at its best
    baseline = progress.add_task(f"alert: traffic on {scenario.subject}, building the monitor's baseline", total=None)
    failing = progress.add_task("alert: provider failing (80% undelivered), waiting for the alert", total=None,
                                visible=False)  # fmt: skip

    def on_baseline(sends: int, needed: int) -> None:
        progress.update(baseline, total=needed, completed=min(sends, needed))

    def on_failing() -> None:
        progress.update(failing, visible=True, description=(
            f"alert: provider failing (80% undelivered) for {time.monotonic() - (scenario.failed_at or 0):.0f}s, "
            "waiting for the alert"))  # fmt: skip

    alert = show_delivery_alert(settings, scenario=scenario, on_baseline=on_baseline, on_failing=on_failing)
    after_s = time.monotonic() - (scenario.failed_at or time.monotonic())
    progress.update(failing, total=1, completed=1)
    reached = progress.add_task("alert: at the operators' channel", total=None)
    try:
        wait_for(scenario.operator_texts, timeout_s=60, interval_s=0.5, what="the alert at the operators' channel")
        operators = True
    except TimeoutError:
        operators = False
    progress.update(reached, total=1, completed=1)
    return alert, after_s, operators


# --- the knowledge base -----------------------------------------------------------------------------------------


def knowledge_base(settings: Settings, console: Console, documents: list, job: bool, local) -> dict:
    """The demo's copy in copy_library, the knowledge job if asked, then the top rows. The running
    worker owns chDB and records the config's copy there by itself; the job needs chDB to itself, so
    for the job the worker stops first and the demo records the copy directly."""
    from connectors.knowledge import record_copy, top_rows
    from streams.copy.knowledge import library_rows

    if job:
        with console.status("stopping the worker (it owns chDB) to run the knowledge job…"):
            local.stop(["worker"])
    wanted = {r["template_id"] for r in library_rows(documents, datetime.now(UTC))}
    wh = warehouse.connect(settings)
    try:
        if job:
            recorded = record_copy(wh, documents)
            from console.jobs_cli import JobName, run_job

            with console.status("knowledge job (Spark): ranking templates, keywords and phrases…"):
                report = run_job(JobName.knowledge, settings, warehouse=wh, copy_file=None, out=console)
            console.print(f"knowledge job: {report.steps.total:.0f}s, {report.result}")
        else:

            def library() -> set[str]:
                rows = wh.query("SELECT DISTINCT template_id FROM copy_library")
                return {r["template_id"] for r in rows} & wanted

            recorded = len(wait_for(lambda: (found := library()) >= wanted and found, timeout_s=60,
                                    what="the worker to record the demo's copy in copy_library"))  # fmt: skip
        console.print(f"copy_library: {recorded} templates of the demo's (hand-written and generated)")
        top = top_rows(wh, limit=5)
    finally:
        wh.close()
    for found in top.values():
        print_insights(console, found)
    return {"recorded": recorded, "top": {kind: found.rows for kind, found in top.items()}}


def run_demo(
    settings: Settings, console: Console, *, users: int, seed: int, keep_running: bool, knowledge_job: bool = False
) -> dict:
    """The whole scenario on the local stack (started if needed); returns what it showed, for tests."""
    started = time.monotonic()
    own, settings = settings, demo_settings(settings)
    local = stack(settings, progress=lambda msg: console.log(msg))
    worker_record = read_pid_file(local.pid_path("worker"))
    worker_was_running = worker_record is not None and worker_record.is_alive()
    console.rule("[bold]Loopcast demo: an e-commerce promotion in three phases")
    with console.status("starting Kafka, Redis, the provider sandbox and a worker…"):
        local.up([*INFRA, "sandbox", "worker"])
    if uses_llm_sandbox(settings):
        httpx.post(f"{settings.sandbox_base}/_sandbox/llm/faults", json={"malformed_rate": 0.25, "seed": seed})
        console.print(
            f"copy: the stack's own LLM sandbox ({settings.llm_base_url}, OpenAI-compatible, model "
            f"{settings.llm_model}) — it answers 25% of requests with broken copy, which the checks refuse; "
            "set LOOPCAST_LLM_BASE_URL (and _API_KEY, _MODEL) for a real model"
        )
    else:
        console.print(f"copy: {settings.llm_model} at {settings.llm_base_url} (LOOPCAST_LLM_BASE_URL)")
    monitor = settings.monitor
    console.print(
        f"delivery-rate monitor: {monitor.window_s:g}s window against the {monitor.baseline_s:g}s before it, "
        f"{monitor.bucket_s:g}s buckets"
        + (" (the demo's; production defaults 30s / 600s / 5s)" if not worker_was_running else "")
        + ("; [yellow]the worker was already running: its own windows apply[/]" if worker_was_running else "")
    )
    run_started = datetime.now(UTC)
    run = run_started.strftime("r%m%d%H%M%S")
    shop = make_shop(users, seed, run)
    peak = make_peak(run, users)
    warmup, previews = warmup_events(shop, seed)
    events = trigger_events(shop, seed)
    shoppers = Shoppers(seed=seed, run=run)
    # Never twice: some triggers arrive again, as a producer's retry or a replay would send them.
    replayed = events[:: max(1, len(events) // 25)]

    console.rule("[bold]Copy per phase: briefs → checked copy → templates → A/B variants")
    copies = generate_phase_copy(settings, console)
    config, phases = with_generated_copy([*documents(settings), *peak_campaign_documents(peak)], copies)
    print_copies(console, phases, config)

    wh = warehouse.connect(settings)
    try:
        before, warm_before = totals(wh), totals(wh, (WARMUP,))
    finally:
        wh.close()

    async def setup() -> None:
        async with httpx.AsyncClient() as client:
            await client.post(
                f"{settings.sandbox_base}/_sandbox/webhook/faults",
                json={"undelivered_rate": 0.06, "error_rate": 0.03, "receipt_delay_ms": 300, "seed": seed},
            )
        state = State(settings.redis)
        await state.put_profiles(shop.profiles)
        await state.put_profiles([{"user_id": u, "name": rng_name(u)} for u in peak.users])
        await state.close()
        await produce(settings.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in config])
        await produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in warmup])
        await produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in events])
        await produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in replayed])
        await produce_raw(settings.bootstrap, topics.EVENTS.name, [(None, bad) for bad in MALFORMED])

    asyncio.run(setup())
    console.rule("[bold]The promotion runs")
    console.log(
        f"shop: {users} shoppers, {len(PRODUCTS)} products; {len(warmup)} warm-up events (coupons, cart adds), "
        f"{len(events)} cart_abandoned / order_unpaid events and {len(MALFORMED)} malformed ones produced"
    )

    wh = warehouse.connect(settings)
    try:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            settled = progress.add_task("messages settled", total=len(events))

            def all_terminal() -> bool:
                row = totals(wh, since=before)
                progress.update(settled, completed=int(row.get("targeted") or 0))
                return int(row.get("targeted") or 0) >= len(events)

            wait_for(all_terminal, timeout_s=180, what="every message to reach a terminal outcome")
            warm = progress.add_task("warm-up previews settled", total=previews)

            def previews_settled() -> bool:
                done = totals(wh, (WARMUP,), since=warm_before)["targeted"]
                progress.update(warm, completed=min(done, previews))
                return done >= previews

            wait_for(previews_settled, timeout_s=120, what=f"{previews} warm-up previews to settle")

            reacting = progress.add_task("shoppers reacting", total=None)

            def loop_settled() -> bool:
                asyncio.run(_react_once(settings, shoppers))
                row = totals(wh, since=before)
                progress.update(
                    reacting, description=f"shoppers: {shoppers.clicks} clicks, {shoppers.purchases} purchases"
                )
                receipts = int(row.get("delivered") or 0) + int(row.get("undelivered") or 0)
                return (
                    receipts >= int(row.get("sent") or 0)
                    and int(row.get("clicked") or 0) >= shoppers.clicks
                    and int(row.get("converted") or 0) >= len(shoppers.buyers)
                    and len(shoppers.seen) >= int(row.get("delivered") or 0)
                    # The A/B loop has judged the variants on real numbers at least once.
                    and bool(wh.query(DECISION_AFTER_SQL, {"campaign": CART}))
                )

            wait_for(loop_settled, timeout_s=180, interval_s=0.5, what="receipts, clicks and conversions to settle")
            progress.update(reacting, total=1, completed=1)
            peak_report = run_peak(settings, console, peak, run, progress)
            pushed = sum(r["pushes"] for r in peak_report["steps"])
            stored_task = progress.add_task("peak: outcomes in ClickHouse", total=pushed)

            def peak_stored() -> int:
                n = wh.query(PEAK_SENT_SQL, {"c": PEAK, "run": run})[0]["n"]
                progress.update(stored_task, completed=n)
                return n >= pushed and n

            peak_sent = wait_for(peak_stored, timeout_s=60, interval_s=0.5, what="the peak's outcomes in ClickHouse")
        rows = [r for r in funnel_report(wh) if r["campaign_id"] in (WARMUP, *CAMPAIGNS, PEAK)]
        dead = wh.query(
            "SELECT stage, reason FROM dead_letters FINAL WHERE occurred_at >= {since:DateTime64(3, 'UTC')}"
            " ORDER BY offset",
            {"since": run_started},
        )
        tagged = wh.query("SELECT count() AS n FROM user_tag_changes WHERE tag = 'price_sensitive'")[0]["n"]
        previewed = wh.query(
            "SELECT user_id FROM outcomes WHERE campaign_id = {c:String} AND code = 'sent'"
            " AND startsWith(user_id, {run:String}) ORDER BY user_id LIMIT 1",
            {"c": WARMUP, "run": run},
        )
        mine = "startsWith(user_id, {run:String}) AND campaign_id IN ({cart:String}, {unpaid:String})"
        twice = wh.query(
            f"SELECT countIf(code = 'deduplicated') AS replays, uniqExactIf(message_id, code = 'sent') AS sent,"
            f" countIf(code = 'sent') - uniqExactIf(message_id, code = 'sent') AS sent_twice FROM outcomes FINAL"
            f" WHERE {mine}",
            {"run": run, "cart": CART, "unpaid": UNPAID},
        )[0]
    finally:
        wh.close()
    console.rule("[bold]Funnel (from ClickHouse)")
    print_funnel(console, rows)
    sample = previewed[0]["user_id"] if previewed else shop.profiles[0]["user_id"]
    inbox = httpx.get(f"{settings.http_base}/v1/users/{sample}/inbox", timeout=10).json()
    console.print(
        f"warm-up: {tagged} shoppers tagged price_sensitive by the coupon rule; {previews} previews owed to the "
        f"segment; {sample}'s in-app inbox: {len(inbox['items'])} message(s), {inbox['unread']} unread"
    )
    print_peak(console, peak_report, peak_sent)
    console.print(
        f"never twice: {len(replayed)} trigger events arrived again → {twice['sent_twice']} messages sent twice "
        f"({twice['replays']} caught as duplicates, the others suppressed again by the cap that stopped them)"
    )
    console.print(f"dead letters kept with their reason (this run): {len(dead)}")
    for letter in dead[:5]:
        console.print(f"  [dim]{letter['stage']}[/]: {letter['reason'][:100]}")

    console.rule("[bold]Alert: a provider fails")
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        alert, alert_after_s, at_operators = run_alert(settings, console, run, progress)
    console.print(
        f"[bold red]{alert.kind}[/] ({alert.severity.value}) on [bold]{alert.subject}[/]: {alert.message}\n"
        f"raised {alert_after_s:.0f}s after the provider started failing; the operators' channel "
        f"({settings.alert_channel}, the WeCom bot sandbox) "
        + ("received it" if at_operators else "[red]did not receive it within 60s[/]")
    )

    console.rule("[bold]Knowledge base: what the copy earned")
    knowledge = knowledge_base(settings, console, config, knowledge_job, local)
    console.print(f"demo finished in {time.monotonic() - started:.0f}s")
    if keep_running:
        with console.status("starting the worker again…"):
            # With the person's own settings: the demo's monitor windows and LLM choice were for the demo.
            stack(own, progress=lambda msg: console.log(msg)).up(["worker"])
        console.print(
            "The stack is still running: try [bold]loopcast report funnel[/], [bold]loopcast report alerts[/], "
            "[bold]loopcast copy insights[/] or [bold]loopcast sql 'SELECT code, count() FROM outcomes GROUP BY "
            "code'[/]; [bold]loopcast stack down[/] stops it."
        )
    else:
        local.down()
    return {
        "run": run,
        "funnel": rows,
        "copies": {p.campaign_id: p for p in phases},
        "peak": peak_report,
        "peak_sent": peak_sent,
        "alert": alert,
        "alert_after_s": alert_after_s,
        "alert_at_operators": at_operators,
        "knowledge": knowledge,
        "dead_letters": len(dead),
        "sent_twice": twice["sent_twice"],
    }


PEAK_SENT_SQL = (
    "SELECT uniqExact(message_id) AS n FROM outcomes WHERE campaign_id = {c:String} AND code = 'sent'"
    " AND startsWith(user_id, {run:String})"
)


def rng_name(user_id: str) -> str:
    return random.Random(user_id).choice(FIRST_NAMES)


async def _react_once(settings: Settings, shoppers: Shoppers) -> None:
    async with httpx.AsyncClient() as client:
        await react(settings, shoppers, client)
