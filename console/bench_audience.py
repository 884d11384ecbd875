"""`loopcast bench audience`: on generated data, a Spark segment build (10M users × 100M events by
default) beside chDB counting the same rule, the audience size of a 3-node segment from bitmaps,
the real-time membership check the match stage makes per trigger, and broadcast fan-out to Kafka.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from connectors.segment_sql import to_sql
from console.services import INFRA, stack
from infra.settings import Settings
from schemas.segments import Segment

CITIES = ["Hangzhou", "Shanghai", "Beijing", "Shenzhen", "Chengdu", "Wuhan", "Xi'an", "Nanjing"]
EVENT_TYPES = ["login", "view", "cart_add", "order_created", "order_paid", "coupon_claimed"]
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
# The 3-node segment measured everywhere: price-sensitive shoppers in two cities who added to cart this week.
SEGMENT = Segment(
    id="bench-deal-hunters",
    name="price-sensitive cart adders in Hangzhou or Shanghai",
    root={
        "type": "and",
        "nodes": [
            {"type": "has_tag", "tag": "price_sensitive"},
            {"type": "attribute", "name": "city", "op": "in", "value": ["Hangzhou", "Shanghai"]},
            {"type": "performed", "event_type": "cart_add", "within": {"amount": 7, "unit": "days"}},
        ],
    },
)


def generate(spark, folder: Path, users: int, events: int) -> None:
    """The four audience tables as Parquet, generated inside Spark (no Python per row)."""
    from pyspark.sql import functions as F

    ids = spark.range(users)
    ids.select(
        F.concat(F.lit("u"), F.col("id").cast("string")).alias("user_id"),
        (18 + F.col("id") % 50).alias("age"),
        F.element_at(F.array(*map(F.lit, CITIES)), (F.col("id") % len(CITIES) + 1).cast("int")).alias("city"),
        F.lit("CN").alias("country"),
        (F.col("id") % 5).alias("vip_level"),
        F.lit(None).cast("string").alias("gender"),
        (F.lit(NOW) + F.make_interval(days=(F.col("id") % 60 - 20).cast("int"))).alias("membership_expires_at"),
        F.lit(None).cast("timestamp").alias("last_login_at"),
        F.lit(None).cast("timestamp").alias("signup_at"),
        F.lit("Asia/Shanghai").alias("timezone"),
        (F.col("id") % 1000).cast("double").alias("lifetime_value"),
    ).write.mode("overwrite").parquet(str(folder / "user_attributes"))
    ids.where(F.col("id") % 3 == 0).select(
        F.concat(F.lit("u"), F.col("id").cast("string")).alias("user_id"), F.lit("price_sensitive").alias("tag")
    ).write.mode("overwrite").parquet(str(folder / "user_tags"))
    spark.range(events).select(
        F.concat(F.lit("u"), (F.abs(F.xxhash64("id")) % users).cast("string")).alias("user_id"),
        F.element_at(F.array(*map(F.lit, EVENT_TYPES)), (F.abs(F.hash("id")) % len(EVENT_TYPES) + 1).cast("int")).alias(
            "event_type"
        ),
        (F.lit(NOW) - F.make_interval(secs=(F.abs(F.xxhash64(F.col("id") + 7)) % (30 * 86400)).cast("int"))).alias(
            "occurred_at"
        ),
    ).write.mode("overwrite").parquet(str(folder / "user_events"))
    spark.createDataFrame([], "package_id string, user_id string").write.mode("overwrite").parquet(
        str(folder / "package_members")
    )


def chdb_count(folder: Path) -> tuple[int, float]:
    """The same rule counted by chDB straight over the Parquet files (views named like the tables)."""
    from chdb import session

    with tempfile.TemporaryDirectory() as scratch:
        s = session.Session(scratch)
        try:
            for table in ("user_attributes", "user_tags", "user_events", "package_members"):
                s.query(f"CREATE VIEW {table} AS SELECT * FROM file('{folder / table}/*.parquet', Parquet)")
            started = time.perf_counter()
            result = s.query(to_sql(SEGMENT, "clickhouse", NOW, count=True), "CSV")
            return int(str(result).strip()), time.perf_counter() - started
        finally:
            s.cleanup()


async def bitmap_sizes(settings: Settings, universe: int) -> dict:
    """Size of 'A and B and C' over `universe` users, from bitmaps in Redis: cold (a fresh process
    fetches and decodes them) and warm (cached by version in the process)."""
    from pyroaring import BitMap

    from connectors.audience_store import AudienceStore

    store = AudienceStore(settings.redis)
    try:
        await store.put_bitmap("bench-a", BitMap(range(0, universe, 3)))
        await store.put_bitmap("bench-b", BitMap(range(1, universe, 4)))
        await store.put_bitmap("bench-c", BitMap(range(0, universe, 7)))
        expression = ("and", "bench-a", "bench-b", "bench-c")
        cold, warm = [], []
        for _ in range(10):
            fresh = AudienceStore(settings.redis)
            started = time.perf_counter()
            size = await fresh.size(expression)
            cold.append((time.perf_counter() - started) * 1000)
            await fresh.close()
        for _ in range(50):
            started = time.perf_counter()
            await store.size(expression)
            warm.append((time.perf_counter() - started) * 1000)
        return {"size": size, "cold_ms": sorted(cold)[len(cold) // 2], "warm_ms": sorted(warm)[len(warm) // 2]}
    finally:
        await store.close()


async def membership_checks(settings: Settings, samples: int) -> dict:
    """What the match stage pays per trigger for a segment audience: the user's live profile from
    Redis and the segment judged on it, one user at a time."""
    from redis.asyncio import Redis

    from connectors.profiles import Profiles
    from schemas.models import Event
    from streams.segments import evaluate, max_window

    redis = Redis.from_url(settings.redis)
    profiles = Profiles(redis)
    users = [f"bench-m{i}" for i in range(samples)]
    pipe = redis.pipeline(transaction=False)
    for i, user in enumerate(users):
        pipe.set(f"profile:{user}", f'{{"user_id": "{user}", "city": "{CITIES[i % 8]}", "age": {20 + i % 40}}}')
        if i % 2:
            pipe.sadd(f"tags:{user}", "price_sensitive")
    await pipe.execute()
    recent = [
        Event(
            event_id=f"e{i}", event_type="cart_add", user_id=u, occurred_at=datetime.now(UTC) - timedelta(hours=i % 200)
        )
        for i, u in enumerate(users)
    ]
    await profiles.observe(recent, [{} for _ in recent], {"cart_add": timedelta(days=7)})
    lookback = max_window(SEGMENT.root)
    timings, members = [], 0
    for user in users:
        started = time.perf_counter()
        [facts] = await profiles.facts([user], lookback)
        members += evaluate(SEGMENT.root, facts, datetime.now(UTC), lambda *_: False)
        timings.append((time.perf_counter() - started) * 1000)
    await redis.delete(*(f"profile:{u}" for u in users), *(f"tags:{u}" for u in users), *(f"ev:{u}" for u in users))
    await redis.aclose()
    timings.sort()
    return {"p50_ms": timings[len(timings) // 2], "p99_ms": timings[int(len(timings) * 0.99)], "members": members}


async def fan_out(settings: Settings, members: int) -> dict:
    """A broadcast of one campaign to a segment of `members` users, into loopcast.matched."""
    import uuid

    from connectors.audience_store import AudienceStore
    from schemas.config import Campaign, Trigger
    from streams.broadcast import run_broadcast

    store = AudienceStore(settings.redis)
    try:
        await store.set_members("bench-broadcast", [f"bench-b{i}" for i in range(members)])
    finally:
        await store.close()
    campaign = Campaign(
        id="bench-broadcast", name="b", trigger=Trigger(event_type="never"), channel="x", template_id="t"
    )
    report = await run_broadcast(settings, campaign, "bench-broadcast", f"bench-{uuid.uuid4().hex[:8]}", chunk=10_000)
    return {"members": report.members, "rate": report.rate, "seconds": report.seconds}


def run_audience_bench(settings: Settings, console: Console, *, users: int, events: int, broadcast: int) -> dict:
    from jobs.common import spark_session
    from jobs.segments import run as build_segments

    with console.status("starting Kafka and Redis…"):
        stack(settings).up(list(INFRA))
    folder = Path(tempfile.mkdtemp(prefix="loopcast-bench-audience-"))
    results: dict = {}
    try:
        with console.status("starting Spark (local[2])…"):
            spark = spark_session("local[2]", app_name="loopcast-bench", shuffle_partitions=8, driver_memory="6g")
        try:
            with console.status(f"generating {users:,} users and {events:,} events in Spark…"):
                started = time.perf_counter()
                generate(spark, folder, users, events)
                results["generate_s"] = time.perf_counter() - started
            with console.status("building the segment with Spark…"):
                started = time.perf_counter()
                built = build_segments(spark, folder, folder / "out", [SEGMENT], NOW)
                results["spark_s"] = time.perf_counter() - started
                results["spark_members"] = built.members[SEGMENT.id]
        finally:
            spark.stop()
        with console.status("counting the same rule with chDB…"):
            results["chdb_members"], results["chdb_s"] = chdb_count(folder)
        with console.status("bitmap sizes…"):
            results["bitmaps"] = asyncio.run(bitmap_sizes(settings, users))
        with console.status("membership checks…"):
            results["membership"] = asyncio.run(membership_checks(settings, 10_000))
        with console.status(f"broadcasting to {broadcast:,} members…"):
            results["broadcast"] = asyncio.run(fan_out(settings, broadcast))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    table = Table(title=f"Audience benchmark ({users:,} users, {events:,} events; one run, this machine)")
    for column in ("measure", "value", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row("generate the data (Spark, Parquet)", f"{results['generate_s'] / 60:.1f} min", "")
    table.add_row(
        "segment build, Spark local[2] (3-node segment)",
        f"{results['spark_s'] / 60:.1f} min ({results['spark_members']:,} members)",
        "<= 5 min",
    )
    table.add_row(
        "the same rule counted by chDB over the same Parquet",
        f"{results['chdb_s']:.1f} s ({results['chdb_members']:,})",
        "same count",
    )
    b = results["bitmaps"]
    table.add_row(
        f"audience size of a 3-node segment from bitmaps ({users:,} users): cold / warm",
        f"{b['cold_ms']:.1f} / {b['warm_ms']:.2f} ms",
        "< 100 ms",
    )
    m = results["membership"]
    table.add_row(
        "membership check in the match stage: p50 / p99", f"{m['p50_ms']:.2f} / {m['p99_ms']:.2f} ms", "p99 < 1 ms"
    )
    f = results["broadcast"]
    table.add_row(f"broadcast fan-out into Kafka ({f['members']:,} members)", f"{f['rate']:,.0f} msg/s", ">= 50,000")
    console.print(table)
    return results
