"""Reports people read: the funnel per campaign as a table with bars, and recent alerts, from ClickHouse rows."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

STEPS = ("targeted", "sent", "delivered", "clicked", "converted")
BAR_WIDTH = 30


def bar(value: int, top: int) -> str:
    filled = round(BAR_WIDTH * value / top) if top else 0
    return "█" * filled + "·" * (BAR_WIDTH - filled)


VARIANTS_SQL = (
    "SELECT variant, sent, delivered, clicked, converted, ctr, cvr FROM variant_funnel "
    "WHERE campaign_id = {campaign:String} ORDER BY variant"
)
DECISION_SQL = (
    "SELECT status, winner, metric, samples, probabilities, reason, decided_at FROM ab_decisions "
    "WHERE campaign_id = {campaign:String} ORDER BY decided_at DESC LIMIT 1"
)


def funnel_report(warehouse, campaign_id: str | None = None) -> list[dict]:
    """The campaign funnel, with each campaign's variants and its latest A/B decision."""
    from connectors.warehouse import funnel

    rows = funnel(warehouse, campaign_id)
    for row in rows:
        row["variants"] = warehouse.query(VARIANTS_SQL, {"campaign": row["campaign_id"]})
        decision = warehouse.query(DECISION_SQL, {"campaign": row["campaign_id"]})
        row["decision"] = decision[0] if decision else None
    return rows


ALERTS_SQL = (
    "SELECT occurred_at, severity, kind, subject, message, value, alert_id FROM alerts FINAL "
    "WHERE occurred_at >= now64(3) - toIntervalSecond({seconds:UInt32}) ORDER BY occurred_at DESC LIMIT {limit:UInt32}"
)


def alerts_report(warehouse, hours: float = 24, limit: int = 50) -> list[dict]:
    """The latest alerts (loopcast.alerts, table `alerts`), newest first."""
    return warehouse.query(ALERTS_SQL, {"seconds": int(hours * 3600), "limit": int(limit)})


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
        if row.get("variants"):
            variants = Table(
                "variant", "sent", "clicked", "converted", "CTR", "CVR", title="A/B variants", show_edge=False
            )
            for v in row["variants"]:
                variants.add_row(
                    str(v["variant"]),
                    f"{int(v['sent']):,}",
                    f"{int(v['clicked']):,}",
                    f"{int(v['converted']):,}",
                    f"{float(v['ctr']):.1%}",
                    f"{float(v['cvr']):.1%}",
                )
            console.print(variants)
        if row.get("decision"):
            d = row["decision"]
            console.print(
                f"  A/B decision: [bold]{d['status']}[/] {d['winner'] or ''} "
                f"({d['metric']}, {int(d['samples']):,} exposures): {d['reason']}\n"
            )
