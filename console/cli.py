"""`loopcast`: the one entry point for people — the local stack, workers, config, events, SQL,
reports, the demo and the benchmark."""

from __future__ import annotations

import asyncio
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.table import Table

from console.audience_cli import broadcast_app, package_app
from console.copy_cli import copy_app
from console.jobs_cli import jobs_app
from console.profiles_cli import profiles_app
from infra.settings import Settings

app = typer.Typer(help="Loopcast: the right message, on the right channel, at the right time.", no_args_is_help=True)
stack_app = typer.Typer(
    help="The local stack: Kafka (KRaft), Redis, provider sandboxes, a worker.", no_args_is_help=True
)
report_app = typer.Typer(help="Reports from ClickHouse.", no_args_is_help=True)
config_app = typer.Typer(help="Campaigns, templates and channels on the config topic.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(report_app, name="report")
app.add_typer(config_app, name="config")
console = Console()
err = Console(stderr=True)
# The demo and the benchmarks start the local stack and stop it when done, unless asked not to.
KeepRunning = Annotated[bool, typer.Option(help="Leave the stack running afterwards.")]


class Format(StrEnum):
    table = "table"
    json = "json"


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@stack_app.command("prepare")
def stack_prepare() -> None:
    """Install what the stack needs (Java, Maven, Redis from apt if missing; Kafka jars from Maven Central)."""
    from infra.stack import ensure_kafka_jars, ensure_system_packages

    settings = Settings()
    ensure_system_packages(progress=console.print)
    console.print(f"Kafka {settings.kafka_version} jars in {ensure_kafka_jars(settings, progress=console.print)}")


@stack_app.command("up")
def stack_up(
    workers: Annotated[bool, typer.Option("--workers/--no-workers", help="Also start a background worker.")] = False,
    urgent_lane: Annotated[
        bool, typer.Option(help="Workers as two lanes: urgent (match → dispatch.high) and bulk (the rest).")
    ] = False,
) -> None:
    """Start (or keep) the local stack; safe to run twice."""
    from console.services import INFRA, bulk_lane_env, stack

    services = [*INFRA, "sandbox", *(["worker"] if workers or urgent_lane else [])]
    settings = Settings()
    env = bulk_lane_env(settings) if urgent_lane else None
    with console.status("starting the local stack…") as status:
        local = stack(settings, progress=lambda msg: status.update(msg), worker_env=env)
        if urgent_lane and not any(s.name == "worker-urgent" and s.running for s in local.status()):
            local.stop(["worker"])  # a worker running every stage would do the urgent lane's work twice
        local.up([*services, *(["worker-urgent"] if urgent_lane else [])])
    stack_status()


@stack_app.command("down")
def stack_down() -> None:
    """Stop exactly the processes `stack up` started."""
    from console.services import stack

    stack(Settings(), progress=console.print).down()
    console.print("stack stopped")


@stack_app.command("status")
def stack_status() -> None:
    from console.services import stack

    table = Table("service", "pid", "running", "healthy", "address")
    for s in stack(Settings()).status():
        table.add_row(s.name, str(s.pid or "-"), "yes" if s.running else "no", "yes" if s.healthy else "no", s.address)
    console.print(table)


@app.command()
def worker(
    stages: Annotated[
        str, typer.Option(help="Comma-separated stage families or names; default LOOPCAST_STAGES, else all.")
    ] = "",
    loglevel: Annotated[str, typer.Option(help="crit, error, warn, info or debug")] = "warn",
    processes: Annotated[
        int, typer.Option(help="Worker processes sharing the stages' partitions; default LOOPCAST_WORKER_PROCESSES.")
    ] = 0,
) -> None:
    """Run the stages in the foreground: one process, or a supervisor of several."""
    from infra.workers import default_processes, supervise
    from streams.app import run_worker
    from streams.topology import select

    try:
        settings = Settings()
        chosen = select([s.strip() for s in (stages or settings.stages).split(",") if s.strip()] or None)
    except ValueError as exc:
        raise fail(str(exc)) from None
    count = processes or settings.worker_processes or default_processes(chosen)
    if count > 1:
        raise typer.Exit(supervise(chosen, count, loglevel, settings.owner_nice, settings.send_path_halves))
    sys.argv = [sys.argv[0]]  # mode's worker parses argv; ours is already parsed
    run_worker(settings, chosen, loglevel)


sandbox_app = typer.Typer(help="Provider sandboxes on loopback, for trying channels by hand.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
channels_app = typer.Typer(help="The channel providers Loopcast can send through.", no_args_is_help=True)
app.add_typer(channels_app, name="channels")
app.add_typer(package_app, name="package")
app.add_typer(profiles_app, name="profiles")
app.add_typer(jobs_app, name="jobs")
app.add_typer(copy_app, name="copy")
app.add_typer(broadcast_app, name="broadcast")


segment_app = typer.Typer(
    help="Segments: compile to SQL, count in ClickHouse, size from bitmaps.", no_args_is_help=True
)
app.add_typer(segment_app, name="segment")


class Dialect(StrEnum):
    clickhouse = "clickhouse"
    spark = "spark"


def _segment(file: Path):
    """A segment from JSON: a bare segment or the document published on the config topic."""
    from schemas.segments import Segment

    try:
        data = json.loads(file.read_text())
        data.pop("kind", None), data.pop("version", None), data.pop("status", None)
        return Segment.model_validate(data)
    except (OSError, ValueError) as exc:
        raise fail(f"{file}: {exc}") from None


@segment_app.command("compile")
def segment_compile(
    file: Path, dialect: Annotated[Dialect, typer.Option("--dialect")] = Dialect.clickhouse, count: bool = False
) -> None:
    """Print the SQL a segment (JSON) compiles to: the same tree, in ClickHouse's or Spark's dialect."""
    from datetime import UTC, datetime

    from connectors.segment_sql import to_sql

    print(to_sql(_segment(file), dialect.value, datetime.now(UTC), count=count))


@segment_app.command("count")
def segment_count(file: Path) -> None:
    """The segment's audience size, counted by ClickHouse over the audience tables, and the time taken."""
    import time
    from datetime import UTC, datetime

    from connectors import warehouse
    from connectors.segment_sql import to_sql

    segment = _segment(file)
    wh = warehouse.connect(Settings())
    try:
        started = time.perf_counter()
        [row] = wh.query(to_sql(segment, "clickhouse", datetime.now(UTC), count=True))
        took_ms = (time.perf_counter() - started) * 1000
    except Exception as exc:
        raise fail(str(exc)) from None
    finally:
        wh.close()
    console.print(f"segment [bold]{segment.id}[/]: {row['users']:,} users ({took_ms:,.1f} ms in ClickHouse)")


@sandbox_app.command("up")
def sandbox_up() -> None:
    """Start every provider's sandbox in the background; a channel's url of <base>/<scheme> points at one."""
    from connectors.channels.base import REGISTRY
    from console.services import stack

    settings = Settings()
    stack(settings, progress=lambda line: console.print(f"[dim]{line}[/]")).up(["sandbox"])
    console.print(f"sandboxes for {len(REGISTRY)} providers at [bold]{settings.sandbox_base}/<scheme>[/]")
    console.print(f"inspect what arrived: {settings.sandbox_base}/_sandbox/<scheme>/requests")


@sandbox_app.command("down")
def sandbox_down() -> None:
    from console.services import stack

    stack(Settings()).stop(["sandbox"])


@sandbox_app.command("serve")
def sandbox_serve() -> None:
    """Serve the provider sandboxes in the foreground."""
    from connectors.channels.sandboxes import main

    main()


@channels_app.command("list")
def channels_list(fmt: Annotated[Format, typer.Option("--format")] = Format.table) -> None:
    """Every registered provider: its channel kind, limits, and whether it returns ids and receipts."""
    from connectors.channels.base import REGISTRY, adapter_class

    rows = []
    for scheme in sorted(REGISTRY):
        cls = adapter_class(scheme)
        rows.append(
            {
                "scheme": scheme,
                "channel_kind": cls.channel_kind,
                "limits": cls.limits.model_dump(exclude_none=True),
                "returns_provider_ids": cls.returns_provider_ids,
                "sends_receipts": cls.sends_receipts,
                "credentials": sorted(cls.Credentials.model_fields),
            }
        )
    if fmt is Format.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} channel providers")
    for column in ("scheme", "kind", "limits", "ids", "receipts"):
        table.add_column(column)
    for row in rows:
        limits = ", ".join(f"{k}={v:g}" for k, v in row["limits"].items())
        table.add_row(
            row["scheme"], row["channel_kind"], limits, "yes" if row["returns_provider_ids"] else "—",
            "yes" if row["sends_receipts"] else "—",
        )  # fmt: skip
    console.print(table)


def _load_documents(path: Path) -> list[dict]:
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else list(yaml.safe_load_all(text))
    if isinstance(data, dict):
        data = [data]
    flat: list[dict] = []
    for item in data:
        flat += item if isinstance(item, list) else [item] if item else []
    return flat


@config_app.command("apply")
def config_apply(file: Path) -> None:
    """Validate and publish campaigns, templates and channels (YAML or JSON)."""
    from connectors.kafka import produce
    from infra import topics
    from schemas.config import Campaign, Channel, Template

    adapter = TypeAdapter(Campaign | Template | Channel)
    try:
        documents = [adapter.validate_python(d) for d in _load_documents(file)]
    except ValidationError as exc:
        raise fail(f"{file}: {exc}") from None
    settings = Settings()
    asyncio.run(produce(settings.bootstrap, topics.CONFIG.name, [(d.key, d.to_record()) for d in documents]))
    for d in documents:
        console.print(f"published {d.key} v{d.version}")


@app.command()
def produce(
    file: Annotated[Path, typer.Argument(help="Events as JSON lines (or a JSON array); '-' reads stdin.")],
    raw: Annotated[bool, typer.Option(help="Send lines as they are, unvalidated (to exercise the DLQ).")] = False,
) -> None:
    """Validate events and produce them to loopcast.events as Avro."""
    from connectors.kafka import produce as produce_records
    from connectors.kafka import produce_raw
    from infra import topics
    from schemas.models import Event

    text = sys.stdin.read() if str(file) == "-" else file.read_text()
    stripped = text.lstrip()
    lines = [json.dumps(item) for item in json.loads(text)] if stripped.startswith("[") else text.splitlines()
    settings = Settings()
    if raw:
        n = asyncio.run(produce_raw(settings.bootstrap, topics.EVENTS.name, ((None, line.encode()) for line in lines)))
        console.print(f"produced {n} raw records")
        return
    events, errors = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(Event.model_validate_json(line))
        except ValidationError as exc:
            errors.append(f"line {number}: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
    if errors:
        for e in errors[:20]:
            err.print(e)
        raise fail(f"{len(errors)} invalid event(s); nothing was produced")
    n = asyncio.run(produce_records(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in events]))
    console.print(f"produced {n} events")


def print_rows(rows: list[dict], fmt: Format, title: str | None = None) -> None:
    if fmt is Format.json:
        console.print_json(json.dumps(rows, default=str))
        return
    table = Table(*(rows[0].keys() if rows else ["(no rows)"]), title=title)
    for row in rows:
        table.add_row(*(f"{v:.1%}" if isinstance(v, float) and 0 <= v <= 1 else str(v) for v in row.values()))
    console.print(table)


@app.command()
def sql(query: str, format: Annotated[Format, typer.Option("--format")] = Format.table) -> None:
    """Run a read-only query on ClickHouse (through the worker that owns chDB, if one runs)."""
    from connectors import warehouse

    wh = warehouse.connect(Settings())
    try:
        rows = wh.query(query)
    except Exception as exc:
        raise fail(str(exc)) from None
    finally:
        wh.close()
    print_rows(rows, format)


@report_app.command("funnel")
def report_funnel(
    campaign: Annotated[str | None, typer.Option(help="One campaign id; default all.")] = None,
    format: Annotated[Format, typer.Option("--format")] = Format.table,
) -> None:
    """Targeted → sent → delivered → clicked → converted per campaign, with rates."""
    from connectors import warehouse
    from console.reports import funnel_report, print_funnel

    wh = warehouse.connect(Settings())
    try:
        rows = funnel_report(wh, campaign)
    finally:
        wh.close()
    if format is Format.json:
        print_rows(rows, format)
    else:
        print_funnel(console, rows)


@report_app.command("alerts")
def report_alerts(
    hours: Annotated[float, typer.Option(help="How far back.")] = 24,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    format: Annotated[Format, typer.Option("--format")] = Format.table,
) -> None:
    """Recent alerts: delivery-rate drops and recoveries per channel and provider."""
    from connectors import warehouse
    from console.reports import alerts_report

    wh = warehouse.connect(Settings())
    try:
        rows = alerts_report(wh, hours, limit)
    finally:
        wh.close()
    print_rows(rows, format, title="alerts")


@app.command()
def demo(
    users: Annotated[int, typer.Option(help="Shoppers in the generated shop.")] = 300,
    seed: Annotated[int, typer.Option()] = 7,
    keep_running: KeepRunning = False,
    knowledge_job: Annotated[
        bool, typer.Option(help="Run the Spark knowledge job (~35 s: keywords, phrases) before the top rows.")
    ] = True,
) -> None:
    """The e-commerce promotion end to end: generated copy per phase, shoppers, the peak's live stock, the
    funnel, the knowledge base, a provider failing and its alert; stops the stack unless --keep-running."""
    from console.demo import run_demo

    run_demo(Settings(), console, users=users, seed=seed, keep_running=keep_running, knowledge_job=knowledge_job)


bench_app = typer.Typer(help="Benchmarks (not tests): numbers for this machine, printed as tables.")
app.add_typer(bench_app, name="bench")
ab_app = typer.Typer(help="A/B tests: the decision rule on any numbers.", no_args_is_help=True)
app.add_typer(ab_app, name="ab")


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    events: Annotated[int, typer.Option(help="Trigger events pushed through the pipeline.")] = 20_000,
    raw_messages: Annotated[int, typer.Option(help="Messages for the raw Kafka baseline.")] = 200_000,
    backlog: Annotated[int, typer.Option(help="Low-priority backlog the urgent messages cut through.")] = 100_000,
    keep_running: KeepRunning = False,
) -> None:
    """Raw Kafka throughput, then the whole pipeline: burst (1 and all-core worker processes), paced
    1k/s and 5k/s, CPU per message per stage, urgent latency under a backlog — in one run; stops the
    stack unless --keep-running."""
    if ctx.invoked_subcommand is not None:
        return
    from console.bench import run_bench

    run_bench(Settings(), console, events=events, raw_messages=raw_messages, backlog=backlog, keep_running=keep_running)


@bench_app.command("render")
def bench_render(messages: Annotated[int, typer.Option(help="Messages rendered per channel.")] = 20_000) -> None:
    """Render + adapt throughput of a typical template, per channel, on one core."""
    from console.bench import run_render_bench

    run_render_bench(console, messages=messages)


@bench_app.command("audience")
def bench_audience(
    users: Annotated[int, typer.Option(help="Generated users.")] = 10_000_000,
    events: Annotated[int, typer.Option(help="Generated events.")] = 100_000_000,
    broadcast: Annotated[int, typer.Option(help="Members of the broadcast segment.")] = 1_000_000,
) -> None:
    """Segment build in Spark vs chDB, bitmap audience sizes, membership checks, broadcast fan-out."""
    from console.bench_audience import run_audience_bench

    run_audience_bench(Settings(), console, users=users, events=events, broadcast=broadcast)


@bench_app.command("dispatch")
def bench_dispatch(
    sends: Annotated[int, typer.Option(help="Messages sent in the throughput run.")] = 30_000,
    latency_ms: Annotated[float, typer.Option(help="How long the provider sandbox takes to answer.")] = 5,
    keep_running: KeepRunning = False,
) -> None:
    """One worker's sends/s to an HTTP provider sandbox, and how fast an outage moves traffic to the standby."""
    from console.bench_dispatch import run_dispatch_bench

    run_dispatch_bench(Settings(), console, sends=sends, latency_ms=latency_ms, keep_running=keep_running)


@bench_app.command("policy")
def bench_policy(
    messages: Annotated[int, typer.Option(help="Messages through the policy checks.")] = 100_000,
    backlog: Annotated[int, typer.Option(help="Low-priority messages queued before the urgent ones.")] = 100_000,
    layout: Annotated[
        list[str] | None, typer.Option(help="Only these deployments (repeatable): 'urgent lane', 'one worker, …'.")
    ] = None,
    keep_running: KeepRunning = False,
) -> None:
    """Policy check throughput, and urgent latency under a low-priority backlog with and without routing."""
    from console.bench import LAYOUTS, run_policy_bench

    unknown = set(layout or []) - set(LAYOUTS)
    if unknown:
        raise fail(f"unknown layout(s) {sorted(unknown)}; choose from {list(LAYOUTS)}")
    run_policy_bench(Settings(), console, messages=messages, backlog=backlog, layouts=layout, keep_running=keep_running)


@bench_app.command("ab")
def bench_ab(trials: Annotated[int, typer.Option(help="Simulated experiments per scenario.")] = 500) -> None:
    """The A/B rule under continuous monitoring: correct and false winners, samples to a decision."""
    from console.bench import print_ab_table
    from streams.copy.variants import bench_table

    with console.status(f"simulating {trials} experiments per scenario…"):
        rows = bench_table(trials=trials)
    print_ab_table(console, rows)


@ab_app.command("decide")
def ab_decide(
    stats: Annotated[Path, typer.Option(help="JSON: experiment, per-variant stats, deadline_passed.")],
) -> None:
    """Print the decision for these numbers as JSON: winner or continue, probabilities, reason."""
    from streams.copy.variants import Experiment, VariantStats, decide

    data = json.loads(stats.read_text())
    try:
        experiment = Experiment.model_validate(data["experiment"])
        variant_stats = [VariantStats.model_validate(s) for s in data["stats"]]
    except (KeyError, ValidationError) as exc:
        raise fail(f"{stats}: {exc}") from None
    decision = decide(variant_stats, experiment, deadline_passed=bool(data.get("deadline_passed")))
    console.print_json(decision.model_dump_json())


@app.command()
def render(
    template: Annotated[Path, typer.Argument(help="A template document (YAML or JSON).")],
    profile: Annotated[Path, typer.Option(help="The user's profile as JSON.")],
    channel: Annotated[str, typer.Option(help="A channel format: sms, sms-cn, push-fcm, email, wecom, …")],
    event: Annotated[Path | None, typer.Option(help="The trigger event (or just its properties) as JSON.")] = None,
    brand: Annotated[str | None, typer.Option(help="Signature for SMS formats.")] = None,
) -> None:
    """Preview a template adapted to one channel, as JSON; nothing is sent."""
    from schemas.config import Template
    from streams.copy.channels import RULES, AdaptationError
    from streams.copy.language import MissingField
    from streams.render import preview

    if channel not in RULES:
        raise fail(f"unknown channel format {channel!r}; choose from {', '.join(sorted(RULES))}")
    try:
        [document] = _load_documents(template)
        parsed = Template.model_validate({"kind": "template", "id": template.stem, **document})
    except (ValueError, ValidationError) as exc:
        raise fail(f"{template}: {exc}") from None
    try:
        result = preview(
            parsed,
            json.loads(profile.read_text()),
            json.loads(event.read_text()) if event else {},
            channel,
            brand=brand,
        )
    except (MissingField, AdaptationError) as exc:
        raise fail(f"cannot render for {channel}: {exc}") from None
    console.print_json(json.dumps(result, ensure_ascii=False))
