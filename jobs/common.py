"""What the batch jobs share: a lean Spark session, ClickHouse → Parquet export, Parquet → ClickHouse
and Redis load-back, and timed steps. The jobs rebuild from history what the streams keep up to date,
so they move whole tables in and out; every load-back replaces what an earlier run wrote.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from sqlglot import exp

if TYPE_CHECKING:
    import pyarrow as pa
    import redis
    from pyspark.sql import SparkSession

    from connectors.warehouse import Warehouse

AUDIENCE_TABLES: tuple[str, ...] = ("user_attributes", "user_tags", "user_events", "package_members")
REDIS_CHUNK = 5_000
INSERT_CHUNK = 50_000
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class JobError(RuntimeError):
    """A job cannot run as asked (no writable warehouse, missing input...); the message says why."""


# --------------------------------------------------------------------------------------------
# Spark


def spark_session(
    master: str | None = None,
    *,
    app_name: str = "loopcast-jobs",
    shuffle_partitions: int = 2,
    driver_memory: str = "512m",
) -> SparkSession:
    """A Spark session for small and medium batch jobs: no UI, few shuffle partitions, UTC.

    Parquet timestamps are written as TIMESTAMP_MICROS (UTC-adjusted), which pyarrow and ClickHouse
    read as instants, and partition values stay strings (a segment id "123" is not a number).
    Memory and JVM options only apply when this call starts the JVM. `master` None: spark-submit's
    --master when spark-submit launched us (it sets PYSPARK_GATEWAY_PORT), local[1] otherwise.
    """
    from pyspark.sql import SparkSession

    if master is None and "PYSPARK_GATEWAY_PORT" not in os.environ:
        master = "local[1]"

    settings = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.default.parallelism": str(shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.catalogImplementation": "in-memory",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.sources.partitionColumnTypeInference.enabled": "false",
        "spark.driver.memory": driver_memory,
        # Short-lived JVM: the serial collector and the C1 compiler start faster than the defaults.
        "spark.driver.extraJavaOptions": "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Duser.timezone=UTC",
    }
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    for key, value in settings.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def parse_now(text: str | None) -> dt.datetime:
    """--now as an aware UTC instant (a naive time is taken as UTC); the current time when absent."""
    if not text:
        return dt.datetime.now(dt.UTC)
    moment = dt.datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


# --------------------------------------------------------------------------------------------
# Timed steps


@dataclass
class Steps:
    """Named steps with their durations, shown as a spinner while they run and as a table after."""

    console: Console | None = None
    timings: list[tuple[str, float, str]] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, str]]:
        """Time the block; the yielded dict's "detail" goes into the summary."""
        info: dict[str, str] = {"detail": ""}
        started = time.perf_counter()
        if self.console is not None:
            with self.console.status(f"{name}…"):
                yield info
        else:
            yield info
        elapsed = time.perf_counter() - started
        self.timings.append((name, elapsed, info["detail"]))
        if self.console is not None:
            self.console.print(f"[green]✓[/green] {name} [dim]{elapsed:.1f}s[/dim] {info['detail']}")

    @property
    def total(self) -> float:
        return sum(seconds for _, seconds, _ in self.timings)

    def table(self, title: str) -> Table:
        table = Table("step", "seconds", "detail", title=title)
        for name, seconds, detail in self.timings:
            table.add_row(name, f"{seconds:.2f}", detail)
        table.add_row("[bold]total[/bold]", f"[bold]{self.total:.2f}[/bold]", "")
        return table


# --------------------------------------------------------------------------------------------
# ClickHouse → Parquet


def sql_string(value: str) -> str:
    """A ClickHouse string literal for `value`, quoted by sqlglot (for statements without parameters)."""
    return exp.Literal.string(value).sql(dialect="clickhouse")


def _identifier(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise JobError(f"bad table name {name!r}")
    return name


def require_writable(warehouse: Warehouse) -> None:
    """Export and load-back need the engine itself (chDB held by this process, or a server)."""
    from connectors.warehouse import EmbeddedWarehouse, ServerWarehouse

    if not isinstance(warehouse, EmbeddedWarehouse | ServerWarehouse):
        raise JobError(
            f"{warehouse!r} is the worker's read-only SQL endpoint: the worker owns the chDB data directory, "
            "and jobs export from and load back into the warehouse directly. Stop the worker "
            "(`loopcast stack down`) or point LOOPCAST_CLICKHOUSE_URL at a ClickHouse server, then run again."
        )


def _replacing(warehouse: Warehouse, table: str) -> bool:
    rows = warehouse.query(
        "SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = {t:String}", {"t": table}
    )
    if not rows:
        raise JobError(f"the warehouse has no table {table!r} (run migrations first)")
    return "Replacing" in rows[0]["engine"]


def export_tables(warehouse: Warehouse, out_dir: Path, tables: Iterable[str] = AUDIENCE_TABLES) -> dict[str, int]:
    """Write each table to `out_dir/<table>/<table>.parquet` (replacing an earlier export); rows per table.

    ReplacingMergeTree tables are read with FINAL, so rows a merge has not collapsed yet are exported
    once. chDB writes the file itself (INSERT INTO FUNCTION file), a server streams Parquet to us.
    """
    import pyarrow.parquet as pq

    from connectors.warehouse import _SERVER_PARQUET_SETTINGS, EmbeddedWarehouse, ServerWarehouse

    require_writable(warehouse)
    counts: dict[str, int] = {}
    for table in tables:
        select = f"SELECT * FROM {_identifier(table)}{' FINAL' if _replacing(warehouse, table) else ''}"
        folder = Path(out_dir).resolve() / table
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        target = folder / f"{table}.parquet"
        if isinstance(warehouse, EmbeddedWarehouse):
            warehouse.command(
                f"INSERT INTO FUNCTION file({sql_string(str(target))}, 'Parquet') {select}"
                " SETTINGS engine_file_truncate_on_insert = 1"
            )
        else:
            assert isinstance(warehouse, ServerWarehouse)
            stream = warehouse.client.raw_stream(select, settings=_SERVER_PARQUET_SETTINGS, fmt="Parquet")
            with open(target, "wb") as sink:
                for chunk in stream:
                    sink.write(chunk)
        counts[table] = pq.ParquetFile(target).metadata.num_rows
    return counts


# --------------------------------------------------------------------------------------------
# Parquet → ClickHouse and Redis


def read_parquet(path: Path, columns: list[str] | None = None, partition: str | None = None) -> pa.Table:
    """A Parquet dataset written by Spark (or one file); `partition` names its hive partition column,
    read as a string and URI-decoded the way Spark escapes it."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    partitioning = None
    if partition is not None:
        partitioning = pads.partitioning(pa.schema([(partition, pa.string())]), flavor="hive")
    dataset = pads.dataset(
        str(path), format="parquet", partitioning=partitioning, exclude_invalid_files=True, ignore_prefixes=["_", "."]
    )
    return dataset.to_table(columns=columns, use_threads=False)


def insert_table(warehouse: Warehouse, table: str, data: pa.Table, extra: Mapping[str, Any] | None = None) -> int:
    """Insert an Arrow table (plus constant columns `extra`) through warehouse.insert, in chunks."""
    written = 0
    for batch in data.to_batches(max_chunksize=INSERT_CHUNK):
        rows = batch.to_pylist()
        if extra:
            for row in rows:
                row.update(extra)
        written += warehouse.insert(table, rows)
    return written


def replace_set(client: redis.Redis, key: str, members: Iterable[str], chunk: int = REDIS_CHUNK) -> int:
    """Make `key` a set of exactly `members`, atomically for readers: fill a temporary key, then
    RENAME it over `key` (an empty set deletes `key`, as Redis has no empty sets)."""
    temporary = f"{key}:building:{uuid.uuid4().hex}"
    count = 0
    try:
        batch: list[str] = []
        for member in members:
            batch.append(member)
            if len(batch) >= chunk:
                count += _sadd(client, temporary, batch)
                batch = []
        if batch:
            count += _sadd(client, temporary, batch)
        if count:
            client.rename(temporary, key)
        else:
            client.delete(key)
    finally:
        client.delete(temporary)  # left over only when something failed
    return count


def _sadd(client: redis.Redis, key: str, members: list[str]) -> int:
    client.sadd(key, *members)
    return len(members)


def sync_sets(client: redis.Redis, wanted: Mapping[str, set[str]], prefix: str, chunk: int = REDIS_CHUNK) -> int:
    """Bring every `<prefix><id>` set to `wanted[id]` with SADD/SREM of the differences (readers
    never see a set emptied and refilled), and delete the `<prefix>*` sets of ids not in `wanted`.
    Pipelined in chunks of `chunk` keys; the number of members added or removed."""
    changed = 0
    ids = list(wanted)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        read = client.pipeline(transaction=False)
        for key in part:
            read.smembers(prefix + key)
        current = read.execute()
        write = client.pipeline(transaction=False)
        for key, have in zip(part, current, strict=True):
            have = {m.decode() if isinstance(m, bytes) else m for m in have}
            extra, missing = have - wanted[key], wanted[key] - have
            if extra:
                write.srem(prefix + key, *extra)
            if missing:
                write.sadd(prefix + key, *missing)
            changed += len(extra) + len(missing)
        write.execute()
    stale: list[str] = []
    for raw in client.scan_iter(match=_glob_escape(prefix) + "*", count=chunk):
        name = raw.decode() if isinstance(raw, bytes) else raw
        if name[len(prefix) :] not in wanted:
            stale.append(name)
    for start in range(0, len(stale), chunk):
        client.delete(*stale[start : start + chunk])
    return changed


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def write_manifest(out_dir: Path, name: str, content: dict[str, Any]) -> Path:
    """A small JSON file next to a job's Parquet output (Spark and pyarrow skip `_` files)."""
    path = Path(out_dir) / f"_{name}.json"
    path.write_text(json.dumps(content, indent=2, default=str))
    return path


def read_manifest(out_dir: Path, name: str) -> dict[str, Any]:
    path = Path(out_dir) / f"_{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise JobError(f"{path} not found: run the job into {out_dir} first") from None


def job_main(
    argv: Sequence[str] | None,
    *,
    description: str,
    name: str,
    input_help: str,
    output_help: str,
    definitions: str,
    definitions_help: str,
    run: Callable[[Any, Path, Path, Any, dt.datetime], Any],
    load: Callable[[Path], Any],
    summary: Callable[[Any], dict[str, Any]],
) -> int:
    """The command line both jobs share (what spark-submit runs): input and output folders, the
    definitions file (tag rules, segments), an optional instant; prints a JSON summary."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", required=True, type=Path, help=input_help)
    parser.add_argument("--output", required=True, type=Path, help=output_help)
    parser.add_argument(f"--{definitions}", required=True, type=Path, help=definitions_help)
    parser.add_argument("--now", help="ISO 8601 instant the job is evaluated at (default: now)")
    parser.add_argument("--master", default=os.environ.get("LOOPCAST_SPARK_MASTER"), help="default: local[1]")
    args = parser.parse_args(argv)
    spark = spark_session(args.master, app_name=f"loopcast-{name}")
    try:
        result = run(spark, args.input, args.output, load(getattr(args, definitions)), parse_now(args.now))
    finally:
        spark.stop()
    print(json.dumps({"now": result.now.isoformat(), **summary(result)}))
    return 0
