"""`loopcast bench`: in one run, the raw Kafka client baseline on the local broker, then the
whole pipeline (events in → requests at the provider sandbox): throughput and latency.

Latency is measured from each event's occurred_at to the sandbox receiving its message, in two
regimes: a burst (everything produced at once: queueing included) and a paced stream below
capacity (what one event sees when the system keeps up).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from connectors.kafka import group_lag, produce, skip_to_end
from console.services import INFRA, leave, stack
from infra import topics
from infra.settings import Settings
from infra.waiting import wait_for
from schemas.config import Campaign, Channel, Priority, Template, Trigger
from schemas.contracts import encode
from schemas.models import Event
from streams.policy import Category, QuietHours

PAYLOAD = b"x" * 200


async def raw_kafka(settings: Settings, n: int) -> tuple[float, float]:
    """aiokafka produce (batched sends) and consume (getmany) rates, messages/s."""
    topic = f"loopcast.bench.raw.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, settings.partitions, 1)])
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=5, max_batch_size=512 * 1024)
    await producer.start()
    try:
        started = time.perf_counter()
        partitions = sorted(await producer.partitions_for(topic))
        sent = 0
        while sent < n:
            for p in partitions:
                batch = producer.create_batch()
                while sent < n and batch.append(key=None, value=PAYLOAD, timestamp=None) is not None:
                    sent += 1
                batch.close()
                await producer.send_batch(batch, topic, partition=p)
        await producer.flush()
        produce_rate = n / (time.perf_counter() - started)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    try:
        received = 0
        started = time.perf_counter()
        while received < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10000)
            received += sum(len(v) for v in batches.values())
        consume_rate = n / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await admin.delete_topics([topic])
        await admin.close()
    return produce_rate, consume_rate


def bench_documents(settings: Settings, run: str) -> list:
    return [
        Channel(
            id="bench-hook",
            provider="webhook",
            url=f"{settings.sandbox_base}/webhook/bench",
            # Many messages per request, as receivers that take batches are fed at volume.
            options={"batch_max": "500"},
        ),
        Template(id="bench-t", title="Deal", body="{{ product }} is back in stock"),
        Campaign(
            id=f"bench-{run}",
            name="bench",
            trigger=Trigger(event_type=f"bench_{run}"),
            channel="bench-hook",
            template_id="bench-t",
            priority=Priority.high,
            daily_cap=1_000_000,
            # Measured at any hour: quiet hours would defer everything at night.
            quiet_hours=QuietHours(enabled=False),
        ),
    ]


def events(run: str, start: int, n: int) -> list[tuple[str, Event]]:
    now = datetime.now(UTC)
    return [
        (
            f"b{i}",
            Event(
                event_id=f"{run}-{i}",
                event_type=f"bench_{run}",
                user_id=f"b{i}",
                occurred_at=now,
                properties={"product": "earbuds"},
            ),
        )
        for i in range(start, start + n)
    ]


def sandbox_stats(settings: Settings) -> dict:
    return httpx.get(f"{settings.sandbox_base}/_sandbox/webhook/stats", timeout=10).json()


def reset_sandbox(settings: Settings) -> None:
    httpx.post(f"{settings.sandbox_base}/_sandbox/webhook/reset", timeout=10).raise_for_status()
    httpx.post(
        f"{settings.sandbox_base}/_sandbox/webhook/faults",
        json={"latency_ms": 0, "error_rate": 0, "throttle_rate": 0, "outage": False, "undelivered_rate": 0},
        timeout=10,
    ).raise_for_status()


def pipeline_burst(settings: Settings, n: int, progress: Progress) -> dict:
    run = uuid.uuid4().hex[:6]
    reset_sandbox(settings)
    asyncio.run(
        produce(
            settings.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in bench_documents(settings, run)]
        )
    )
    # A handful first: the worker picks up the new campaign before the clock starts.
    asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, events(run, 0, 10)))
    wait_for(lambda: sandbox_stats(settings)["received"] >= 10, timeout_s=60, what="warm-up messages")
    reset_sandbox(settings)
    task = progress.add_task("pipeline burst", total=n)
    started = time.time()
    asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, events(run, 10, n)))
    produced_at = time.time()

    def done() -> bool:
        received = sandbox_stats(settings)["received"]
        progress.update(task, completed=received)
        return received >= n

    wait_for(done, timeout_s=max(120, n / 50), interval_s=0.25, what=f"{n} messages at the sandbox")
    stats = sandbox_stats(settings)
    return {
        "run": run,
        "events": n,
        "seconds": stats["last_at"] - started,
        "produce_s": produced_at - started,
        "rate": n / (stats["last_at"] - started),
        "latency": stats["latency_ms"],
        # Counted at the provider, per message id: none may be missing, none may come twice.
        "missing": n - stats["unique_messages"],
        "twice": stats["received"] - stats["unique_messages"],
    }


@contextlib.contextmanager
def generator_heap_frozen():
    """Keeps the load generator's own garbage collection out of the latencies it measures: a full
    collection of this process's heap (the bursts' and the backlog's leftovers) took 25 ms in the
    middle of a paced run, and the events stamped before it waited. As the workers do after start-up."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def pipeline_paced(
    settings: Settings,
    run: str,
    rate: float,
    seconds: float,
    progress: Progress,
    first: int = 1_000_000,
    tick: float = 0.05,
) -> dict:
    """Events at `rate`, `rate * tick` of them every `tick` seconds."""
    reset_sandbox(settings)
    total = int(rate * seconds)
    task = progress.add_task(f"pipeline paced at {rate:.0f}/s", total=total)
    per_tick = max(1, int(rate * tick))

    async def pace() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=1)
        await producer.start()
        try:
            start = asyncio.get_running_loop().time()
            sent = 0
            while sent < total:
                for key, event in events(run, first + sent, min(per_tick, total - sent)):
                    await producer.send(topics.EVENTS.name, encode(event), key=key.encode())
                sent += per_tick
                progress.update(task, completed=min(sent, total))
                # Pacing a load generator is the one place a timed wait is the point.
                next_at = start + tick * (sent // per_tick)
                await asyncio.sleep(max(0.0, next_at - asyncio.get_running_loop().time()))
            await producer.flush()
        finally:
            await producer.stop()

    with generator_heap_frozen():
        asyncio.run(pace())
    wait_for(lambda: sandbox_stats(settings)["received"] >= total, timeout_s=120, what="paced messages at the sandbox")
    return {"rate": rate, "tick": tick, "events": total, "latency": sandbox_stats(settings)["latency_ms"]}


def pipeline_lag(settings: Settings) -> int:
    """Records some stage has not committed yet, over every stage's consumer group."""

    async def lag() -> int:
        from streams.topology import STAGES

        groups = [(s.group(settings.app_id), [t.name for t in s.inputs]) for s in STAGES]
        return sum([await group_lag(settings.bootstrap, group, names) for group, names in groups])

    return asyncio.run(lag())


def drain(settings: Settings, progress: Progress, what: str) -> None:
    task = progress.add_task(what, total=None)
    wait_for(lambda: pipeline_lag(settings) == 0, timeout_s=600, interval_s=1, what="the workers to catch up")
    progress.update(task, total=1, completed=1)


CLOCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK


def _tree(pid: int) -> list[int]:
    """A process and its descendants (a supervisor and its worker processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def service_cpu(local, names=("worker", "sandbox", "kafka", "redis")) -> dict[str, float]:
    """CPU seconds used so far by each service's processes (with their children)."""
    pids = {s.name: s.pid for s in local.status() if s.pid}
    return {n: sum(_cpu_s(p) for p in _tree(pids[n])) if n in pids else 0.0 for n in names}


def deploy(settings: Settings, local, processes: int, env: dict[str, str] | None = None) -> None:
    """A fresh worker deployment of `processes` processes, without the backlog an earlier one left."""
    from console.services import stack as make_stack

    local.stop(["worker", "worker-urgent"])
    make_stack(settings, worker_env={"LOOPCAST_WORKER_PROCESSES": str(processes), **(env or {})}).up(["worker"])


def burst_with_cost(settings: Settings, local, events: int, progress: Progress, label: str) -> dict:
    before = service_cpu(local)
    burst = pipeline_burst(settings, events, progress)
    drain(settings, progress, f"{label}: receipts and outcomes")
    used = {n: v - before[n] for n, v in service_cpu(local).items()}
    return {**burst, "cpu_us": {n: 1e6 * v / events for n, v in used.items()}}


def stage_costs(settings: Settings, local, events: int, progress: Progress) -> dict[str, float]:
    """CPU per message of each stage family, each in a process of its own (the split deployment)."""
    from streams.topology import FAMILIES

    local.stop(["worker", "worker-urgent"])
    procs = {}
    try:
        for family in FAMILIES:
            argv = [sys.executable, "-m", "console", "worker", "--processes", "1", "--stages", family]
            procs[family] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(
            lambda: httpx.get(f"{settings.http_base}/healthz?ready=1", timeout=1).status_code == 200,
            timeout_s=90,
            what="the split deployment",
            ignore=(httpx.HTTPError,),
        )
        before = {f: _cpu_s(p.pid) for f, p in procs.items()}
        pipeline_burst(settings, events, progress)
        drain(settings, progress, "split deployment: receipts and outcomes")
        return {f: 1e6 * (_cpu_s(p.pid) - before[f]) / events for f, p in procs.items()}
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)


def run_bench(
    settings: Settings, console: Console, *, events: int, raw_messages: int, backlog: int, keep_running: bool = False
) -> dict:
    local = stack(settings)
    cores = settings.processes
    with console.status("starting the local stack…"):
        local.up([*INFRA, "sandbox"])
    with Progress(console=console) as progress:
        task = progress.add_task("raw aiokafka baseline", total=None)
        produce_rate, consume_rate = asyncio.run(raw_kafka(settings, raw_messages))
        progress.update(task, total=1, completed=1)
        # Warm-up, not counted: a Kafka broker just started spends several times the CPU per message until
        # its JIT has compiled the hot paths (first bursts measured 110-230 µs of Kafka CPU a message, warm
        # ones 25-60), and the figures are for a loop that has been running.
        deploy(settings, local, cores)
        burst_with_cost(settings, local, min(events, 10_000), progress, "warm-up")
        scaling = {}
        # The scaling row (1 and 2 processes), and the default deployment (the warehouse owner plus
        # one sending process per core) when that is another.
        for processes in sorted({1, 2, cores}):
            deploy(settings, local, processes)
            scaling[processes] = run = burst_with_cost(settings, local, events, progress, f"{processes} process(es)")
            progress.console.log(f"burst, {processes} process(es): {run['rate']:,.0f} msg/s, {run['latency']}, "
                                 f"{run['missing']} lost, {run['twice']} twice, "
                                 f"CPU µs/msg {({k: round(v) for k, v in run['cpu_us'].items()})}")  # fmt: skip
        burst = scaling[cores]
        # Warm-up of the paced path, not counted either: on a stack started a minute before, the first paced
        # run's p99 was twice a later one's (57-60 ms against 25-30 at 1k/s), same code and load; a burst
        # does not warm it (small batches and requests: which code paths, the broker's or ours, is open).
        # 5 s of it still left the next runs settling: 10 s runs at 1k/s after it gave p99 45, 35, 37, then
        # 31 and 31 ms. In the slow steps the broker used a whole core, and its JIT compilers were still at work.
        pipeline_paced(settings, burst["run"], 1000.0, 20, progress, first=9_000_000)
        drain(settings, progress, "paced warm-up: receipts and outcomes")
        paced = []
        # 20/s: what one message sees on an idle loop; then 1k/s and 5k/s in steps of 50 ms, and 1k/s as a
        # steady stream (a step every 5 ms: many more, smaller batches and requests per message).
        for n, (rate, tick) in enumerate(((20.0, 0.05), (1000.0, 0.05), (1000.0, 0.005), (5000.0, 0.05)), start=1):
            # Event ids of their own per run: the same ids again would be replays, deduplicated.
            paced.append(pipeline_paced(settings, burst["run"], rate, 5 if rate < 100 else 10, progress,
                                        first=n * 1_000_000, tick=tick))  # fmt: skip
            progress.console.log(f"paced at {rate:,.0f}/s, {tick * 1000:.0f} ms steps: {paced[-1]['latency']}")
            drain(settings, progress, f"paced at {rate:,.0f}/s: receipts and outcomes")
        stages = stage_costs(settings, local, min(events, 10_000), progress)
        progress.console.log(f"CPU µs per message per stage: { ({k: round(v) for k, v in stages.items()}) }")
        urgent = priority_run(settings, local, "urgent lane", backlog, progress)
    leave(settings, local, keep_running)
    raw_rate = min(produce_rate, consume_rate)
    table = Table(title="Loopcast benchmark (one run, this machine)")
    columns = ("measure", "messages", "msg/s", "p50 ms", "p99 ms", "lost / twice")
    columns += ("CPU µs/msg (worker · sandbox · kafka · redis)",)
    for column in columns:
        table.add_column(column, justify="right" if column != "measure" else "left")
    table.add_row("raw aiokafka produce (send_batch)", f"{raw_messages:,}", f"{produce_rate:,.0f}", "", "", "", "")
    table.add_row("raw aiokafka consume (getmany)", f"{raw_messages:,}", f"{consume_rate:,.0f}", "", "", "", "")
    for processes, run in scaling.items():
        cpu = run["cpu_us"]
        table.add_row(
            f"burst event → sandbox, {processes} worker process{'es' if processes > 1 else ''}",
            f"{events:,}",
            f"{run['rate']:,.0f}",
            f"{run['latency']['p50']:,.0f}",
            f"{run['latency']['p99']:,.0f}",
            f"{run['missing']} / {run['twice']}",
            f"{cpu['worker']:,.0f} · {cpu['sandbox']:,.0f} · {cpu['kafka']:,.0f} · {cpu['redis']:,.0f}",
        )
    for run in paced:
        table.add_row(
            f"paced at {run['rate']:,.0f}/s in {run['tick'] * 1000:.0f} ms steps, {cores} processes",
            f"{run['events']:,}",
            "",
            f"{run['latency']['p50']:,.0f}",
            f"{run['latency']['p99']:,.0f}",
            "",
            "",
        )
    table.add_row(
        f"urgent under a {backlog:,} low-priority backlog (urgent lane)", "100", "",
        f"{urgent['p50']:,.0f}", f"{urgent['p99']:,.0f}", "", "",
    )  # fmt: skip
    console.print(table)
    costs = Table(title="CPU per message per stage (each stage family in a process of its own)")
    costs.add_column("stage")
    costs.add_column("CPU µs/msg", justify="right")
    costs.add_column("", justify="left")
    top = max(stages.values()) or 1
    for family, us in stages.items():
        costs.add_row(family, f"{us:,.0f}", "█" * max(1, round(30 * us / top)))
    console.print(costs)
    ratio = burst["rate"] / raw_rate
    console.print(
        f"pipeline / raw Kafka throughput: [bold]{ratio:.2%}[/] (five stages, four Kafka hops, Redis, HTTP to the "
        "sandbox and back, ClickHouse; Kafka, Redis, the sandbox and the workers share this machine's cores)"
    )
    return {
        "raw_produce": produce_rate, "raw_consume": consume_rate, "scaling": scaling, "burst": burst,
        "paced": paced, "stages": stages, "urgent": urgent, "ratio": ratio,
    }  # fmt: skip


BENCH_TEMPLATE = {
    "title": "${name}, <#if vip_level gt 1>VIP price: </#if>your cart is waiting",
    "body": "{name}，购物车里的${product_name}只剩${stock}件<#if stock < 5>，快抢！<#else>。</#if>",
    "long_text": 'Hi ${name!"friend"}, you left <#list items as item>${item.name} (¥${item.price}) </#list>'
    "in your cart. <#if vip_level >= 2 && coupon??>Your VIP coupon ${coupon} still applies.</#if>",
    "link": "https://shop.example/cart?u=${user_id}",
    "cta": "Check out",
}
BENCH_FORMATS = ("sms-cn", "push-fcm", "email", "wecom", "slack", "webhook")


def run_render_bench(console: Console, *, messages: int) -> list[dict]:
    """Render + adapt on one core: the template compiled once, each message rendered and adapted."""
    from schemas.config import Template
    from streams.copy.channels import Content, adapt
    from streams.render import render_content, values_for

    template = Template(id="bench", **BENCH_TEMPLATE)
    profiles = [
        {"user_id": f"u{i}", "name": f"用户{i}", "vip_level": i % 4, "coupon": "VIP10" if i % 3 else None}
        for i in range(1000)
    ]
    event = {"product_name": "降噪耳机", "stock": 3}
    # Event properties are flat on the wire; the cart (a list) comes with the profile here.
    for p in profiles:
        p["items"] = [{"name": "耳机", "price": 299}, {"name": "手机壳", "price": 39}]
    rows = []
    for kind in BENCH_FORMATS:
        started = time.perf_counter()
        for i in range(messages):
            parts = render_content(template, values_for(f"u{i}", "cart_abandoned", event, profiles[i % 1000]), None)
            adapt(
                Content(
                    title=parts.get("title"),
                    short_text=parts.get("body"),
                    long_text=parts.get("long_text"),
                    link=parts.get("link"),
                    cta=parts.get("cta"),
                ),
                kind,
                brand="Loopcast",
            )
        elapsed = time.perf_counter() - started
        rows.append({"channel format": kind, "messages": messages, "msg/s (one core)": round(messages / elapsed)})
    table = Table(title="Render + adapt throughput (template with fields, branches and a list)")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "channel format" else "right")
    for row in rows:
        table.add_row(row["channel format"], f"{row['messages']:,}", f"{row['msg/s (one core)']:,}")
    console.print(table)
    console.print("goal: >= 20,000 msg/s per core")
    return rows


def print_ab_table(console: Console, rows: list[dict]) -> None:
    """The simulated A/B rule: rates as percentages, samples per variant."""
    table = Table(title="A/B decision rule under continuous monitoring (simulated; samples per variant)")
    columns = [
        ("scenario", "scenario"),
        ("trials", "trials"),
        ("correct", "correct winner"),
        ("false", "false winner"),
        ("fallback", "fallback"),
        ("mean n", "mean samples to decision"),
        ("fixed n", "fixed-horizon samples"),
    ]
    for header, _ in columns:
        table.add_column(header, justify="left" if header == "scenario" else "right")
    for row in rows:
        cells = []
        for header, key in columns:
            value = row.get(key)
            if value is None:
                cells.append("—")
            elif header in ("correct", "false", "fallback"):
                cells.append(f"{float(value):.1%}")
            elif isinstance(value, int | float) and header != "scenario":
                cells.append(f"{round(value):,}")
            else:
                cells.append(str(value))
        table.add_row(*cells)
    console.print(table)
    console.print("goal: false winners in A/A <= 5%; 'fixed n' is a one-look z-test at alpha 0.05, power 0.8")


async def policy_throughput(settings: Settings, messages: int, batch: int) -> float:
    """The throttle's decision path per message — preferences, quiet hours, dedup and caps — against
    the local Redis, one MGET and one script call per batch, as the stage runs it."""
    from connectors.policy_store import PolicyStore
    from schemas.models import Priority, RenderedMessage
    from streams.throttle import judge, parse_quiet_hours, preferences_of

    store = PolicyStore(settings.redis)
    run = uuid.uuid4().hex[:8]
    quiet = parse_quiet_hours("off")
    now = datetime.now(UTC)
    # Built before the clock starts: the stage gets messages decoded, and decoding is not policy.
    batches = [
        [
            RenderedMessage(message_id=f"{run}-{i}", campaign_id="bench", user_id=f"pu{i % 5000}", channel="c",
                            priority=Priority.normal, triggered_at=now, address="a", body="b")
            for i in range(offset, min(offset + batch, messages))
        ]
        for offset in range(0, messages, batch)
    ]  # fmt: skip
    try:
        started = time.perf_counter()
        for chunk in batches:
            stored = await store.preferences([m.user_id for m in chunk])
            requests = [
                judge(m, None, preferences_of(p), now=now, global_quiet=quiet, default_timezone="Asia/Shanghai",
                      daily_cap=5)
                for m, p in zip(chunk, stored, strict=True)
            ]  # fmt: skip
            await store.admit(requests)
        return messages / (time.perf_counter() - started)
    finally:
        await store.close()


def high_latencies(settings: Settings, campaign_id: str) -> list[float]:
    items = httpx.get(
        f"{settings.sandbox_base}/_sandbox/webhook/requests", params={"limit": 1_000_000}, timeout=60
    ).json()["items"]
    return sorted(
        i["received_at"] * 1000 - i["body"]["triggered_at"] for i in items if i["body"]["campaign_id"] == campaign_id
    )


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


# How urgent traffic is kept ahead of a backlog, in the order the benchmark compares them.
LAYOUTS = {
    "urgent lane": "its own worker for match, render, throttle and dispatch.high; the bulk lane in another",
    "one worker, routing on": "every stage in one worker; lower tiers paused while urgent traffic flows",
    "one worker, routing off": "every stage in one worker, first come first served",
}


def priority_run(settings: Settings, local, layout: str, backlog: int, progress: Progress) -> dict:
    """A low-priority backlog in dispatch.low, then urgent triggers through the whole pipeline."""
    from console.services import bulk_lane_env
    from console.services import stack as make_stack
    from schemas.models import Priority, RenderedMessage
    from streams.topology import URGENT_LANE, select

    run = uuid.uuid4().hex[:6]
    local.stop(["worker", "worker-urgent"])
    # Each deployment starts from the same place: what an earlier run left queued is skipped.
    lower = [topics.DISPATCH_LOW.name, topics.DISPATCH_NORMAL.name]
    asyncio.run(skip_to_end(settings.bootstrap, settings.app_id, lower))
    # A lane's own consumer group starts at the beginning of its topics: not with this run's history.
    urgent_topics = [t.name for spec in select(list(URGENT_LANE)) for t in spec.inputs]
    asyncio.run(skip_to_end(settings.bootstrap, f"{settings.app_id}-urgent", urgent_topics))
    env = {"LOOPCAST_PRIORITY_ROUTING": str(layout != "one worker, routing off").lower()}
    if layout == "urgent lane":
        env |= bulk_lane_env(settings)
    make_stack(settings, worker_env=env).up(["worker", "worker-urgent"] if layout == "urgent lane" else ["worker"])
    reset_sandbox(settings)
    channel, template, _ = bench_documents(settings, run)
    documents = [
        channel,
        template,
        Campaign(
            id=f"urgent-{run}",
            name="urgent",
            trigger=Trigger(event_type=f"urgent_{run}"),
            channel=channel.id,
            template_id=template.id,
            # Urgent in the policy's sense (high-priority service): quiet hours do not hold it back.
            priority=Priority.high,
            category=Category.service,
            daily_cap=1_000_000,
        ),
    ]
    asyncio.run(produce(settings.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in documents]))
    # Warm the urgent path first (a fresh worker's first message opens its provider connection,
    # loads Redis scripts …): the figure is the steady state under a backlog, not a cold start.
    # Sent until three have arrived: the first ones may come before the worker has read the campaign.
    sent = iter(range(1_000))

    def warmed() -> bool:
        i = next(sent)
        warm = Event(event_id=f"{run}-warm{i}", event_type=f"urgent_{run}", user_id=f"warm{i}",
                     occurred_at=datetime.now(UTC), properties={"product": "earbuds"})  # fmt: skip
        asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(warm.user_id, warm)]))
        return len(high_latencies(settings, f"urgent-{run}")) >= 3

    wait_for(warmed, timeout_s=60, interval_s=0.5, what="the warm-up messages")
    reset_sandbox(settings)
    now = datetime.now(UTC)
    low = [
        (
            f"lo{i}",
            RenderedMessage(
                message_id=f"{run}-low-{i}",
                campaign_id=f"backlog-{run}",
                user_id=f"lo{i}",
                channel="bench-hook",
                priority=Priority.low,
                triggered_at=now,
                address="x",
                body="marketing",
            ),
        )
        for i in range(backlog)
    ]
    asyncio.run(produce(settings.bootstrap, topics.DISPATCH_LOW.name, low))
    task = progress.add_task(f"urgent under a {backlog:,} backlog, {layout}", total=100)

    async def urgent() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=1)
        await producer.start()
        try:
            for i in range(100):
                event = Event(
                    event_id=f"{run}-u{i}",
                    event_type=f"urgent_{run}",
                    user_id=f"hi{i}",
                    occurred_at=datetime.now(UTC),
                    properties={"product": "earbuds"},
                )
                await producer.send_and_wait(topics.EVENTS.name, encode(event), key=event.user_id.encode())
                progress.update(task, completed=i + 1)
                await asyncio.sleep(0.05)  # paced trigger stream: 20/s, the point of the measurement
        finally:
            await producer.stop()

    with generator_heap_frozen():
        asyncio.run(urgent())
    wait_for(
        lambda: len(high_latencies(settings, f"urgent-{run}")) >= 100,
        timeout_s=600,
        interval_s=1,
        what="the 100 urgent messages at the sandbox",
    )
    latencies = high_latencies(settings, f"urgent-{run}")
    return {"layout": layout, "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)}


def run_policy_bench(
    settings: Settings,
    console: Console,
    *,
    messages: int,
    backlog: int,
    layouts: list[str] | None = None,
    keep_running: bool = False,
) -> dict:
    local = stack(settings)
    with console.status("starting the local stack…"):
        local.up([*INFRA, "sandbox", "worker"])
    with Progress(console=console) as progress:
        task = progress.add_task("policy checks", total=None)
        rate = asyncio.run(policy_throughput(settings, messages, 500))
        progress.update(task, total=1, completed=1)
        runs = [priority_run(settings, local, layout, backlog, progress) for layout in layouts or LAYOUTS]
    leave(settings, local, keep_running)
    table = Table(title="Delivery policy benchmark (one run, this machine)")
    for column in ("measure", "value", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row(
        "policy checks (dedup + preferences + quiet hours + caps), one core", f"{rate:,.0f} msg/s", ">= 50,000"
    )
    for r in runs:
        label = f"urgent p50 / p99 under {backlog:,} low: {r['layout']}"
        table.add_row(label, f"{r['p50']:,.0f} / {r['p99']:,.0f} ms", "p99 < 1,000" if r is runs[0] else "")
    console.print(table)
    for layout, what in LAYOUTS.items():
        console.print(f"  [bold]{layout}[/]: {what}")
    return {"policy_rate": rate, "priority": runs}
