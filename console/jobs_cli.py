"""`loopcast jobs`: run the Spark batch jobs (tags, segments) against the warehouse and load their
results back into ClickHouse and Redis, once (`run`) or on a cron schedule (`schedule`). The jobs run
in this process with the same functions spark-submit runs (jobs/tags.py, jobs/segments.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from infra.settings import Settings
from jobs.common import AUDIENCE_TABLES, JobError, Steps, parse_now

if TYPE_CHECKING:
    import redis
    from pyspark.sql import SparkSession

    from connectors.warehouse import Warehouse
    from schemas.config import TagRule
    from schemas.segments import Segment

log = logging.getLogger("loopcast.jobs")
jobs_app = typer.Typer(
    help="Spark batch jobs: rebuild tags and counters, materialise segments, rank copy.", no_args_is_help=True
)
console = Console()
err = Console(stderr=True)


class JobName(StrEnum):
    tags = "tags"
    segments = "segments"
    knowledge = "knowledge"


@dataclass
class JobReport:
    name: JobName
    steps: Steps
    result: dict[str, Any] = field(default_factory=dict)


def _config_documents(settings: Settings) -> list[Any]:
    """Every document on loopcast.config, read from the beginning to its current end."""
    from connectors.kafka import read_to_end
    from infra import topics
    from streams.config_store import ConfigStore

    try:
        records = asyncio.run(read_to_end(settings.bootstrap, topics.CONFIG.name))
    except Exception as exc:
        raise JobError(
            f"cannot read {topics.CONFIG.name} from Kafka at {settings.bootstrap} ({type(exc).__name__}: {exc}); "
            "start the stack or pass --rules / --segments FILE"
        ) from None
    store = ConfigStore()
    for record in records:
        store.apply(record.key.decode() if record.key else "", record.value)
    for problem in store.errors:
        log.warning("skipped a config document: %s", problem)
    return list(store.documents.values())


def tag_rules(settings: Settings, rules_file: Path | None) -> list[TagRule]:
    """From the file (in its order), else the config topic (by id)."""
    from jobs.tags import load_rules
    from schemas.config import TagRule

    if rules_file is not None:
        return load_rules(rules_file)
    return sorted((d for d in _config_documents(settings) if isinstance(d, TagRule)), key=lambda r: r.id)


def active_segments(settings: Settings, segments_file: Path | None) -> list[Segment]:
    """From the file, else the active segment documents of the config topic."""
    from jobs.segments import load_segments
    from schemas.config import SegmentDocument

    if segments_file is not None:
        return load_segments(segments_file)
    documents = (d for d in _config_documents(settings) if isinstance(d, SegmentDocument) and d.status == "active")
    return [d.segment for d in sorted(documents, key=lambda d: d.id)]


def copy_documents(settings: Settings, copy_file: Path | None) -> list[Any]:
    """Templates, campaigns and channels: from the file, else the config topic."""
    from jobs.knowledge import load_documents
    from schemas.config import Campaign, Channel, Template

    if copy_file is not None:
        return load_documents(copy_file)
    return [d for d in _config_documents(settings) if isinstance(d, Template | Campaign | Channel)]


def _redis(settings: Settings) -> redis.Redis:
    import redis

    client = redis.Redis.from_url(settings.redis)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        raise JobError(f"Redis at {settings.redis} is unreachable ({exc}): start the stack, or --no-redis") from None
    return client


def run_job(
    name: JobName,
    settings: Settings,
    *,
    rules_file: Path | None = None,
    segments_file: Path | None = None,
    copy_file: Path | None = None,
    now: dt.datetime | None = None,
    master: str | None = None,
    work_dir: Path | None = None,
    use_redis: bool = True,
    warehouse: Warehouse | None = None,
    redis_client: redis.Redis | None = None,
    spark: SparkSession | None = None,
    out: Console | None = None,
) -> JobReport:
    """Export → job → load back, each step timed. What the caller passes in (warehouse, Redis, Spark)
    it keeps; what this opens, it closes."""
    from connectors.warehouse import connect, migrate
    from jobs import knowledge as knowledge_job
    from jobs import segments as segments_job
    from jobs import tags as tags_job
    from jobs.common import export_tables, require_writable, spark_session

    steps = Steps(out)
    report = JobReport(name, steps)
    now = now or dt.datetime.now(dt.UTC)
    base = work_dir or settings.home / "jobs" / name.value
    input_dir, output_dir = base / "input", base / "output"
    opened: list[Any] = []
    try:
        with steps.step("configuration") as info:
            if name is JobName.tags:
                rules = tag_rules(settings, rules_file)
                info["detail"] = f"{len(rules)} tag rules"
            elif name is JobName.knowledge:
                documents = copy_documents(settings, copy_file)
                info["detail"] = f"{len(documents)} templates, campaigns and channels"
            else:
                segments = active_segments(settings, segments_file)
                info["detail"] = f"{len(segments)} active segments"
        with steps.step("export from ClickHouse") as info:
            if warehouse is None:
                warehouse = connect(settings)
                opened.append(warehouse)
            require_writable(warehouse)
            migrate(warehouse)  # the load-back tables (008) may be newer than the last worker run
            tables = {JobName.tags: ("user_events",), JobName.knowledge: ("outcomes",)}.get(name, AUDIENCE_TABLES)
            counts = export_tables(warehouse, input_dir, tables)
            info["detail"] = ", ".join(f"{table} {rows}" for table, rows in counts.items())
        # The knowledge job's output lives in ClickHouse only (priors are read from there on publish).
        if redis_client is None and use_redis and name is not JobName.knowledge:
            redis_client = _redis(settings)
            opened.append(redis_client)
        with steps.step("start Spark"):
            if spark is None:
                spark = spark_session(master, app_name=f"loopcast-{name.value}")
                opened.append(spark)
        with steps.step(f"{name.value} job") as info:
            if name is JobName.tags:
                result = tags_job.run(spark, input_dir, output_dir, rules, now)
                report.result = {"users": result.users, "tags": result.tags, "changes": result.changes}
            elif name is JobName.knowledge:
                ranked = knowledge_job.run(spark, input_dir, output_dir, documents, now)
                report.result = {"copies": ranked.copies, "sends": ranked.sends, **ranked.items}
            else:
                built = segments_job.run(spark, input_dir, output_dir, segments, now)
                report.result = dict(built.members)
            info["detail"] = ", ".join(f"{k} {v}" for k, v in report.result.items())
        load = {JobName.tags: tags_job, JobName.knowledge: knowledge_job}.get(name, segments_job).load_back
        with steps.step("load into ClickHouse") as info:
            loaded = load(output_dir, warehouse=warehouse)
            info["detail"] = ", ".join(f"{k} {v}" for k, v in loaded.items())
        if redis_client is not None:
            with steps.step("load into Redis") as info:
                loaded = load(output_dir, redis_client=redis_client)
                info["detail"] = ", ".join(f"{k} {v}" for k, v in loaded.items())
            if name is JobName.segments:
                with steps.step("segment bitmaps") as info:
                    sizes = asyncio.run(_bitmaps(redis_client, segments_job.membership(output_dir)))
                    info["detail"] = ", ".join(f"{k} {v}" for k, v in sizes.items())
    finally:
        for resource in reversed(opened):
            (resource.stop if hasattr(resource, "stop") else resource.close)()
    return report


async def _bitmaps(client: redis.Redis, members: dict[str, set[str]]) -> dict[str, int]:
    """Each built segment also as a compressed bitmap: sizes and AND/OR of segments in milliseconds.
    Written to the same Redis as the membership sets (the client's own address)."""
    from connectors.audience_store import AudienceStore

    where = client.connection_pool.connection_kwargs
    auth = f":{where['password']}@" if where.get("password") else ""
    store = AudienceStore(
        f"redis://{auth}{where.get('host', '127.0.0.1')}:{where.get('port', 6379)}/{where.get('db', 0)}"
    )
    try:
        return {segment_id: await store.set_members(segment_id, sorted(users)) for segment_id, users in members.items()}
    finally:
        await store.close()


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(1)


RulesOption = Annotated[
    Path | None,
    typer.Option("--rules", exists=True, dir_okay=False, help="Tag rules (JSON list); default: config topic."),
]
SegmentsOption = Annotated[
    Path | None,
    typer.Option("--segments", exists=True, dir_okay=False, help="Segments (JSON list); default: config topic."),
]
MasterOption = Annotated[str | None, typer.Option(help="Spark master, e.g. local[2]; default local[1].")]
WorkDirOption = Annotated[
    Path | None, typer.Option("--work-dir", help="Where the Parquet goes; default <home>/jobs/<name>.")
]
RedisOption = Annotated[bool, typer.Option("--redis/--no-redis", help="Also load the results into Redis.")]
CopyOption = Annotated[
    Path | None,
    typer.Option(
        "--copy", exists=True, dir_okay=False, help="Templates, campaigns, channels (JSON list); default: config topic."
    ),
]


@jobs_app.command("run")
def run(
    name: JobName,
    rules: RulesOption = None,
    segments: SegmentsOption = None,
    copy: CopyOption = None,
    now: Annotated[str | None, typer.Option(help="ISO 8601 instant to compute at; default: now.")] = None,
    master: MasterOption = None,
    work_dir: WorkDirOption = None,
    use_redis: RedisOption = True,
) -> None:
    """Export from the warehouse, run the job with Spark, load the results back; a summary per step.

    The warehouse must be writable from here: chDB with no worker running, or LOOPCAST_CLICKHOUSE_URL."""
    try:
        report = run_job(
            name,
            Settings(),
            rules_file=rules,
            segments_file=segments,
            copy_file=copy,
            now=parse_now(now),
            master=master,
            work_dir=work_dir,
            use_redis=use_redis,
            out=console,
        )
    except (JobError, ValueError) as exc:
        raise _fail(str(exc)) from None
    console.print(report.steps.table(f"loopcast jobs run {name.value}"))
    result = Table("segment" if name is JobName.segments else "output", "rows", title="result")
    for key, value in report.result.items():
        result.add_row(str(key), str(value))
    console.print(result)


@jobs_app.command("schedule")
def schedule(
    name: JobName,
    cron: Annotated[str, typer.Option(help="Five crontab fields: minute hour day month weekday.")] = "0 3 * * *",
    timezone: Annotated[str, typer.Option(help="The zone the cron fields are read in.")] = "UTC",
    rules: RulesOption = None,
    segments: SegmentsOption = None,
    master: MasterOption = None,
    work_dir: WorkDirOption = None,
    use_redis: RedisOption = True,
) -> None:
    """Run a job in the foreground on a cron schedule (APScheduler), logging each run; Ctrl-C stops."""
    from apscheduler.schedulers.blocking import BlockingScheduler
    from apscheduler.triggers.cron import CronTrigger
    from rich.logging import RichHandler

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=err)])
    try:
        trigger = CronTrigger.from_crontab(cron, timezone=timezone)
    except (ValueError, LookupError) as exc:
        raise _fail(f"bad schedule {cron!r} ({timezone}): {exc}") from None
    settings = Settings()

    def tick() -> None:
        try:
            report = run_job(
                name,
                settings,
                rules_file=rules,
                segments_file=segments,
                master=master,
                work_dir=work_dir,
                use_redis=use_redis,
            )
        except Exception:
            log.exception("job %s failed; the next run is still scheduled", name.value)
            return
        timings = ", ".join(f"{step} {seconds:.1f}s" for step, seconds, _ in report.steps.timings)
        log.info("job %s done in %.1fs (%s): %s", name.value, report.steps.total, timings, report.result)

    scheduler = BlockingScheduler(timezone=timezone)
    scheduler.add_job(tick, trigger, id=f"loopcast-{name.value}", max_instances=1, coalesce=True)
    first = trigger.get_next_fire_time(None, dt.datetime.now(dt.UTC))
    log.info("job %s scheduled %r (%s); first run %s", name.value, cron, timezone, first)
    try:
        scheduler.start()
    except (KeyboardInterrupt, SystemExit):
        log.info("scheduler stopped")
