"""`loopcast package …` and `loopcast broadcast …`: uploading audience lists and fanning a campaign
out to a segment, from a terminal. Typer apps only; console/cli.py mounts them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from infra.settings import Settings

if TYPE_CHECKING:
    from connectors.packages import PackageReport
    from schemas.config import Campaign
    from streams.broadcast import BroadcastState
    from streams.config_store import ConfigStore

package_app = typer.Typer(help="User packages: uploaded audience lists in Redis.", no_args_is_help=True)
broadcast_app = typer.Typer(help="Broadcasts: one campaign to every member of a segment.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

# Exit codes: 1 for errors, 2 for a package refused because of its content.
REFUSED = 2


def print_package_report(report: PackageReport) -> None:
    table = Table("", "", title=f"package {report.package_id} ({report.format})", show_header=False)
    table.add_row("lines read", f"{report.lines:,}")
    table.add_row("blank", f"{report.blank:,}")
    table.add_row("valid (distinct)", f"{report.valid:,}")
    table.add_row("duplicates", f"{report.duplicates:,}")
    table.add_row("bad", f"{report.bad_count:,} ({report.bad_share:.2%})")
    if report.unknown is not None:
        verdict = "kept" if report.keep_unknown else "dropped"
        table.add_row("unknown", f"{report.unknown:,} ({verdict})")
    table.add_row("stored", f"{report.stored:,}")
    table.add_row("time", f"parse {report.parse_seconds:.2f}s, store {report.store_seconds:.2f}s")
    console.print(table)
    if report.bad:
        bad = Table("line", "reason", "text", title="bad lines")
        for line, reason, text in report.bad[:50]:
            bad.add_row(str(line), reason, text)
        console.print(bad)
        if report.bad_count > 50:
            console.print(f"… and {report.bad_count - 50:,} more bad lines")
    if report.duplicate_sample:
        dups = ", ".join(f"{u} (lines {first} and {line})" for u, first, line in report.duplicate_sample[:10])
        console.print(f"[yellow]duplicates[/yellow], e.g. {dups}")
    if report.unknown_sample:
        console.print(f"[yellow]unknown ids[/yellow], e.g. {', '.join(report.unknown_sample[:10])}")


@package_app.command("upload")
def package_upload(
    package_id: str,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help=".csv (user_id column) or .txt, maybe .gz")],
    keep_unknown: Annotated[bool, typer.Option(help="Keep ids the id map does not know (default: drop).")] = False,
    max_bad_share: Annotated[float, typer.Option(help="Refuse the file above this share of bad lines.")] = 0.05,
) -> None:
    """Replace a package with the users listed in FILE; refused (exit 2) when too many lines are bad."""
    from connectors.audience_store import AudienceStore
    from connectors.packages import PackageError, PackageRefused, upload_package

    async def run() -> PackageReport:
        store = AudienceStore(Settings().redis)
        try:
            return await upload_package(store, package_id, file, keep_unknown=keep_unknown, max_bad_share=max_bad_share)
        finally:
            await store.close()

    try:
        report = asyncio.run(run())
    except PackageError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    except PackageRefused as exc:
        print_package_report(exc.report)
        err.print(f"[red]refused:[/red] {exc.report.refused_reason}")
        raise typer.Exit(REFUSED) from None
    print_package_report(report)


@package_app.command("size")
def package_size(package_id: str) -> None:
    """How many users a package holds."""
    from connectors.audience_store import AudienceStore

    async def run() -> int:
        store = AudienceStore(Settings().redis)
        try:
            return await store.package_size(package_id)
        finally:
            await store.close()

    console.print(f"{asyncio.run(run()):,}")


async def config_from_topic(settings: Settings) -> ConfigStore:
    """Every document's latest version on the config topic."""
    from connectors.kafka import read_to_end
    from infra import topics
    from streams.config_store import ConfigStore

    store = ConfigStore()
    for record in await read_to_end(settings.bootstrap, topics.CONFIG.name):
        store.apply(record.key.decode() if record.key else "", record.value)
    return store


async def campaign_from_topic(settings: Settings, campaign_id: str) -> Campaign | None:
    """The campaign's latest version on the config topic, or None."""
    return (await config_from_topic(settings)).campaign(campaign_id)


@broadcast_app.command("start")
def broadcast_start(
    campaign_id: str,
    segment: Annotated[str, typer.Option("--segment", help="The segment whose members receive it.")],
    broadcast_id: Annotated[
        str | None,
        typer.Option("--id", help="Names the run; the same id resumes it. Default: <campaign>.<segment>."),
    ] = None,
    campaign_file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Read the campaign from this JSON file.")
    ] = None,
    chunk: Annotated[int, typer.Option(min=1, help="Members per checkpointed chunk.")] = 5000,
) -> None:
    """Send a campaign to every member of a segment; rerun with the same --id to resume after a crash."""
    from schemas.config import Campaign
    from streams.broadcast import BroadcastError, run_broadcast

    settings = Settings()
    if campaign_file:
        campaign = Campaign.model_validate_json(campaign_file.read_text())
        if campaign.id != campaign_id:
            err.print(f"[red]error:[/red] {campaign_file} holds campaign {campaign.id!r}, not {campaign_id!r}")
            raise typer.Exit(1)
    else:
        found = asyncio.run(campaign_from_topic(settings, campaign_id))
        if found is None:
            err.print(f"[red]error:[/red] no campaign {campaign_id!r} on the config topic")
            raise typer.Exit(1)
        campaign = found
    name = broadcast_id or f"{campaign_id}.{segment}"
    console.print(f"broadcast [bold]{name}[/bold] (rerun with --id {name} to resume)")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("members", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            report = asyncio.run(run_broadcast(settings, campaign, segment, name, chunk=chunk, progress=advance))
        except BroadcastError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
    if report.was_done:
        console.print(f"{name} had already finished: nothing sent (choose another --id to send again)")
        return
    resumed = f", resumed after member #{report.already_sent:,}" if report.resumed_from is not None else ""
    console.print(
        f"{report.produced:,} messages to {report.members:,} members in {report.seconds:.1f}s "
        f"({report.rate:,.0f}/s){resumed}"
    )


@broadcast_app.command("status")
def broadcast_status(broadcast_id: str) -> None:
    """The checkpoint of a broadcast: campaign, segment, start time, members acknowledged, done or not."""
    from connectors.audience_store import AudienceStore
    from streams.broadcast import broadcast_state

    async def run() -> BroadcastState | None:
        store = AudienceStore(Settings().redis)
        try:
            return await broadcast_state(store, broadcast_id)
        finally:
            await store.close()

    state = asyncio.run(run())
    if state is None:
        err.print(f"[red]error:[/red] no broadcast {broadcast_id!r}")
        raise typer.Exit(1)
    console.print_json(json.dumps(state.model_dump(mode="json")))
