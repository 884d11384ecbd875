"""`loopcast bench dispatch`: what one worker's dispatch stage sends per second to an HTTP provider
sandbox answering in 5 ms, and how fast traffic moves to the standby provider when the primary
goes into outage. Messages are produced straight into loopcast.dispatch.normal, so the figure is
dispatch alone (claims, provider call with its signature, outcome), not the whole loop.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from connectors.kafka import produce
from console.services import INFRA, leave, stack
from infra import topics
from infra.settings import Settings
from infra.stack import read_pid_file
from infra.waiting import wait_for
from schemas.config import Channel, ProviderRoute
from schemas.models import Priority, RenderedMessage


def sandbox(settings: Settings, scheme: str, action: str, body: dict | None = None) -> dict:
    url = f"{settings.sandbox_base}/_sandbox/{scheme}/{action}"
    response = httpx.post(url, json=body or {}, timeout=10) if action != "stats" else httpx.get(url, timeout=10)
    response.raise_for_status()
    return response.json()


def messages(run: str, channel: str, start: int, n: int) -> list[tuple[str, RenderedMessage]]:
    now = datetime.now(UTC)
    return [
        (
            f"d{i}",
            RenderedMessage(
                message_id=f"{run}-{i}",
                campaign_id=f"bench-dispatch-{run}",
                user_id=f"d{i}",
                channel=channel,
                priority=Priority.normal,
                triggered_at=now,
                address=f"+1555{i:07d}",
                body="Your parcel is on its way",
            ),
        )
        for i in range(start, start + n)
    ]


def cpu_seconds(settings: Settings, service: str) -> float:
    """CPU time (user + system) a managed process has used so far, from /proc."""
    record = read_pid_file(settings.run_dir / f"{service}.pid")
    fields = Path(f"/proc/{record.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(settings: Settings, n: int, latency_ms: float, progress: Progress) -> dict:
    run = uuid.uuid4().hex[:6]
    sandbox(settings, "http-sms", "reset")
    sandbox(settings, "http-sms", "faults", {"latency_ms": latency_ms, "receipts": False, "outage": False})
    channel = Channel(id="bench-dispatch", provider="http-sms", url=f"{settings.sandbox_base}/http-sms", format="sms")
    asyncio.run(produce(settings.bootstrap, topics.CONFIG.name, [(channel.key, channel.to_record())]))
    task = progress.add_task(f"{n:,} sends, sandbox answering in {latency_ms:g} ms", total=n)
    cpu_before = {s: cpu_seconds(settings, s) for s in ("worker", "sandbox")}
    asyncio.run(produce(settings.bootstrap, topics.DISPATCH_NORMAL.name, messages(run, channel.id, 0, n)))

    def done() -> bool:
        received = sandbox(settings, "http-sms", "stats")["received"]
        progress.update(task, completed=received)
        return received >= n

    wait_for(done, timeout_s=600, interval_s=0.5, what=f"{n} sends at the sandbox")
    stats = sandbox(settings, "http-sms", "stats")
    seconds = stats["last_at"] - stats["first_at"]
    cpu = {s: cpu_seconds(settings, s) - before for s, before in cpu_before.items()}
    return {
        "sends": n,
        "seconds": seconds,
        "rate": n / seconds if seconds else float("inf"),
        # The sandbox shares this machine's two cores: sends per CPU-second of the worker is what
        # one worker does with a core of its own.
        "per_worker_cpu_s": n / cpu["worker"] if cpu["worker"] else float("inf"),
        "cpu_s": cpu,
    }


def failover(settings: Settings, rate: float, seconds: float, outage_after_s: float, progress: Progress) -> dict:
    """A paced stream over twilio (weight 1) with http-sms on standby; twilio fails mid-stream."""
    run = uuid.uuid4().hex[:6]
    for scheme in ("twilio", "http-sms"):
        sandbox(settings, scheme, "reset")
        sandbox(settings, scheme, "faults", {"latency_ms": 5, "receipts": False, "outage": False})
    channel = Channel(
        id="bench-failover",
        provider="twilio",
        format="sms",
        providers=[
            ProviderRoute(provider="twilio", url=f"{settings.sandbox_base}/twilio", options={"from": "+15550000"}),
            ProviderRoute(provider="http-sms", url=f"{settings.sandbox_base}/http-sms", weight=0),
        ],
    )
    asyncio.run(produce(settings.bootstrap, topics.CONFIG.name, [(channel.key, channel.to_record())]))
    total = int(rate * seconds)
    task = progress.add_task(f"failover: {rate:g} msg/s, primary down after {outage_after_s:g} s", total=total)
    outage_at: float | None = None

    async def stream() -> None:
        nonlocal outage_at
        started = time.monotonic()
        for i in range(0, total, max(1, int(rate / 20))):
            step = min(int(rate / 20) or 1, total - i)
            await produce(settings.bootstrap, topics.DISPATCH_NORMAL.name, messages(run, channel.id, i, step))
            progress.update(task, completed=i + step)
            if outage_at is None and time.monotonic() - started >= outage_after_s:
                await asyncio.to_thread(sandbox, settings, "twilio", "faults", {"outage": True})
                outage_at = time.time()
            await asyncio.sleep(max(0.0, started + (i + step) / rate - time.monotonic()))  # pacing

    asyncio.run(stream())
    wait_for(
        lambda: (
            sandbox(settings, "twilio", "stats")["received"] + sandbox(settings, "http-sms", "stats")["received"]
            >= total
        ),
        timeout_s=120,
        what="every message at one of the two providers",
    )
    sandbox(settings, "twilio", "faults", {"outage": False})
    backup = httpx.get(
        f"{settings.sandbox_base}/_sandbox/http-sms/requests", params={"limit": 1_000_000}, timeout=30
    ).json()["items"]
    primary = sandbox(settings, "twilio", "stats")
    first_backup = min((item["received_at"] for item in backup), default=None)
    return {
        "messages": total,
        "primary": primary["received"],
        "backup": len(backup),
        "first_on_backup_s": first_backup - outage_at if first_backup and outage_at else None,
        "tries_at_primary_in_outage": primary["faulted"],
    }


def run_dispatch_bench(
    settings: Settings, console: Console, *, sends: int, latency_ms: float, keep_running: bool = False
) -> dict:
    local = stack(settings)
    with console.status("starting the local stack with a dispatch-only worker…"):
        local.up([*INFRA, "sandbox"])
        local.stop(["worker", "worker-urgent"])
        stack(settings, worker_env={"LOOPCAST_STAGES": "dispatch"}).up(["worker"])
    try:
        with Progress(console=console) as progress:
            speed = throughput(settings, sends, latency_ms, progress)
            moved = failover(settings, rate=300, seconds=8, outage_after_s=3, progress=progress)
    finally:
        leave(settings, local, keep_running)
    table = Table(title="Dispatch benchmark (one worker, this machine)")
    for column in ("measure", "value", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row(
        f"sends/s to an HTTP sandbox answering in {latency_ms:g} ms ({sends:,} messages), wall clock",
        f"{speed['rate']:,.0f}",
        ">= 3,000",
    )
    table.add_row(
        "sends per CPU-second of the worker (its capacity on a core of its own)",
        f"{speed['per_worker_cpu_s']:,.0f}",
        ">= 3,000",
    )
    table.add_row(
        "CPU seconds used: worker / provider sandbox",
        f"{speed['cpu_s']['worker']:.1f} / {speed['cpu_s']['sandbox']:.1f}",
        "",
    )
    if moved["first_on_backup_s"] is not None:
        table.add_row(
            "first message on the standby after the primary's outage", f"{moved['first_on_backup_s']:.3f} s", "< 5 s"
        )
    table.add_row(
        # Failed tries: those before the breaker opened, then one probe per open period.
        "messages: on primary / on standby / failed tries at the primary",
        f"{moved['primary']:,} / {moved['backup']:,} / {moved['tries_at_primary_in_outage']:,}",
        f"{moved['messages']:,} in all",
    )
    console.print(table)
    return {"throughput": speed, "failover": moved}
