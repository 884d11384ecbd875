"""The e-commerce demo: a small shop, a cart-abandonment campaign, shoppers who react.

Warm-up: claiming a coupon tags a shopper price-sensitive (a tag rule); adding to cart then brings
a preview into the in-app inbox of the price-sensitive segment. Peak: the cart reminder, "only N
left" from live inventory, against a discount, as a bandit. Long tail: unpaid orders hear that
their discount is extended 24h.

Shoppers act only on what really reached the provider sandbox: they open the tracked link
(a real HTTP click through Loopcast's redirect) and some pay, which Loopcast attributes back
to the message. The funnel at the end is read from ClickHouse with SQL.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from connectors import warehouse
from connectors.kafka import produce, produce_raw
from connectors.state import State
from console.reports import funnel_report, print_funnel
from console.services import INFRA, stack
from infra import topics
from infra.settings import Settings
from infra.waiting import wait_for
from schemas.config import Audience, Campaign, CampaignVariant, Channel, SegmentDocument, TagRule, Template, Trigger
from schemas.models import Event, Priority
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


def run_demo(settings: Settings, console: Console, *, users: int, seed: int, keep_running: bool) -> dict:
    started = time.monotonic()
    local = stack(settings, progress=lambda msg: console.log(msg))
    console.rule("[bold]Loopcast demo: cart abandonment")
    with console.status("starting Kafka, Redis, the provider sandbox and a worker…"):
        local.up([*INFRA, "sandbox", "worker"])
    run_started = datetime.now(UTC)
    run = run_started.strftime("r%m%d%H%M%S")
    shop = make_shop(users, seed, run)
    warmup, previews = warmup_events(shop, seed)
    events = trigger_events(shop, seed)
    shoppers = Shoppers(seed=seed, run=run)
    # Never twice: some triggers arrive again, as a producer's retry or a replay would send them.
    replayed = events[:: max(1, len(events) // 25)]
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
        await state.close()
        await produce(settings.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in documents(settings)])
        await produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in warmup])
        await produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in events])
        await produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in replayed])
        await produce_raw(settings.bootstrap, topics.EVENTS.name, [(None, bad) for bad in MALFORMED])

    asyncio.run(setup())
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

            def previews_settled() -> bool:
                return totals(wh, (WARMUP,), since=warm_before)["targeted"] >= previews

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
        rows = [r for r in funnel_report(wh) if r["campaign_id"] in (WARMUP, *CAMPAIGNS)]
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
    console.print(
        f"never twice: {len(replayed)} trigger events arrived again → {twice['sent_twice']} messages sent twice "
        f"({twice['replays']} caught as duplicates, the others suppressed again by the cap that stopped them)"
    )
    console.print(f"dead letters kept with their reason (this run): {len(dead)}")
    for letter in dead[:5]:
        console.print(f"  [dim]{letter['stage']}[/]: {letter['reason'][:100]}")
    console.print(f"demo finished in {time.monotonic() - started:.0f}s")
    if keep_running:
        console.print(
            "The stack is still running: try [bold]loopcast report funnel[/] or "
            "[bold]loopcast sql 'SELECT code, count() FROM outcomes GROUP BY code'[/]; "
            "[bold]loopcast stack down[/] stops it."
        )
    else:
        local.down()
    return rows


async def _react_once(settings: Settings, shoppers: Shoppers) -> None:
    async with httpx.AsyncClient() as client:
        await react(settings, shoppers, client)
