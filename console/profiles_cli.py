"""`loopcast profiles load FILE`: bulk-load user attributes and addresses (CSV, Parquet or JSON
lines) as profile_updated events, the same path live profile updates take — so Redis (real-time
segments) and ClickHouse (counts, Spark jobs) end up with the same users."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress

from infra.settings import Settings

profiles_app = typer.Typer(help="User profiles: attributes and channel addresses.", no_args_is_help=True)
console = Console()
CHUNK = 10_000


def rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of the file as dicts; empty CSV cells are left out (not set to empty text)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK):
            yield from batch.to_pylist()
    elif path.suffix in (".jsonl", ".ndjson", ".json"):
        with path.open() as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)
    else:
        import csv

        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                yield {k: v for k, v in row.items() if v not in (None, "")}


def as_event(row: dict[str, Any], now: datetime):
    from schemas.models import PROFILE_UPDATED, Event

    user_id = str(row.pop("user_id", "") or "")
    if not user_id:
        raise ValueError("no user_id")
    properties = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
    # The same row loaded twice is the same event: a re-run never counts as a second update.
    digest = hashlib.blake2b(json.dumps(properties, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    return Event(
        event_id=f"profile:{user_id}:{digest}", event_type=PROFILE_UPDATED, user_id=user_id, occurred_at=now,
        properties=properties,
    )  # fmt: skip


@profiles_app.command("load")
def load(file: Annotated[Path, typer.Argument(help="CSV with a user_id column, Parquet, or JSON lines.")]) -> None:
    """Load profiles: every row becomes a profile_updated event for the worker to apply."""
    from connectors.kafka import produce
    from infra import topics

    settings = Settings()
    now = datetime.now(UTC)
    loaded, bad = 0, []
    with Progress(console=console) as progress:
        task = progress.add_task(f"loading {file.name}", total=None)
        chunk: list = []
        for line_no, row in enumerate(rows(file), start=2 if file.suffix == ".csv" else 1):
            try:
                chunk.append(as_event(dict(row), now))
            except ValueError as exc:
                bad.append((line_no, str(exc)))
                continue
            if len(chunk) >= CHUNK:
                loaded += asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in chunk]))
                chunk = []
                progress.update(task, completed=loaded)
        if chunk:
            loaded += asyncio.run(produce(settings.bootstrap, topics.EVENTS.name, [(e.user_id, e) for e in chunk]))
        progress.update(task, completed=loaded, total=loaded)
    console.print(f"{loaded:,} profile updates produced; the worker applies them to Redis and ClickHouse")
    for line_no, reason in bad[:20]:
        console.print(f"[red]line {line_no}[/]: {reason}")
    if bad:
        console.print(f"[red]{len(bad):,} line(s) refused[/]")
        raise typer.Exit(1)
