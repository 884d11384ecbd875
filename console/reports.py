"""Reports people read: the funnel per campaign as a table with bars, from ClickHouse rows."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

STEPS = ("targeted", "sent", "delivered", "clicked", "converted")
BAR_WIDTH = 30


def bar(value: int, top: int) -> str:
    filled = round(BAR_WIDTH * value / top) if top else 0
    return "█" * filled + "·" * (BAR_WIDTH - filled)


def print_funnel(console: Console, rows: list[dict]) -> None:
    if not rows:
        console.print("no outcomes in ClickHouse yet")
        return
    for row in rows:
        top = int(row.get("targeted") or 0)
        table = Table(title=f"campaign {row['campaign_id']}", show_edge=False)
        table.add_column("step")
        table.add_column("messages", justify="right")
        table.add_column("", min_width=BAR_WIDTH)
        for step in STEPS:
            value = int(row.get(step) or 0)
            table.add_row(step, f"{value:,}", bar(value, top))
        console.print(table)
        console.print(
            f"  delivery rate [bold]{float(row.get('delivery_rate') or 0):.1%}[/]   "
            f"CTR [bold]{float(row.get('ctr') or 0):.1%}[/]   "
            f"CVR [bold]{float(row.get('cvr') or 0):.1%}[/]   "
            f"failed {int(row.get('failed') or 0):,}   suppressed {int(row.get('suppressed') or 0):,}\n"
        )
