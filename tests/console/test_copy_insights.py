"""`loopcast copy insights` and `loopcast jobs run knowledge` on their own chDB directory (each command in
its own process, as people run them): templates from the live views first, then every kind from the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [
    {"kind": "channel", "id": "sms", "provider": "webhook", "format": "sms-cn"},
    {"kind": "template", "id": "hot", "body": "${name}，购物车里的宝贝只剩3件，快抢"},
    {"kind": "template", "id": "cold", "body": "${name}，购物车里的宝贝在等你"},
    {
        "kind": "campaign", "id": "cart", "name": "cart", "trigger": {"event_type": "cart_add"}, "channel": "sms",
        "variants": [{"id": "a", "template_id": "hot"}, {"id": "b", "template_id": "cold"}],
    },
]  # fmt: skip
SEED = """
import datetime as dt, json, sys
from connectors.knowledge import record_copy
from connectors.warehouse import connect, migrate
from infra.settings import Settings
from jobs.knowledge import load_documents

now = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
rows = []
for variant, clicks in (("a", 60), ("b", 15)):
    for i in range(300):
        base = dict(message_id=f"{variant}{i}", campaign_id="cart", user_id=f"u{i}", channel="sms",
                    stage="dispatch", triggered_at=now, occurred_at=now)
        rows.append({**base, "code": "sent", "variant": variant})
        if i < clicks:
            rows.append({**base, "code": "clicked", "variant": None})
with connect(Settings()) as wh:
    migrate(wh)
    record_copy(wh, load_documents(sys.argv[1]))
    wh.insert("outcomes", rows)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("copy-cli")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LOOPCAST_")}
    return {**environment, "LOOPCAST_HOME": str(home), "COLUMNS": "200"}


@pytest.fixture(scope="module")
def copy_file(env: dict[str, str]) -> Path:
    path = Path(env["LOOPCAST_HOME"]) / "copy.json"
    path.write_text(json.dumps(DOCUMENTS))
    subprocess.run([sys.executable, "-c", SEED, str(path)], cwd=ROOT, env=env, check=True, timeout=300)
    return path


def _loopcast(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "console", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_insights_from_live_views_then_from_the_job(env: dict[str, str], copy_file: Path) -> None:
    live = json.loads(_loopcast(env, "copy", "insights", "--format", "json").stdout)
    assert live["origin"] == "live views"
    assert [(r["item"], r["sends"], r["clicks"]) for r in live["rows"]] == [("hot", 300, 60), ("cold", 300, 15)]
    table = _loopcast(env, "copy", "insights", "--kind", "keyword").stdout
    assert "live views" in table and "jobs run knowledge" in table

    _loopcast(env, "jobs", "run", "knowledge", "--copy", str(copy_file), "--no-redis")

    keywords = json.loads(_loopcast(env, "copy", "insights", "--kind", "keyword", "--format", "json").stdout)
    assert keywords["origin"] == "copy_knowledge" and keywords["updated_at"]
    items = [r["item"] for r in keywords["rows"]]
    # The hot template's own words lead (60 clicks of 300); words both templates share follow (75 of 600).
    assert (keywords["rows"][0]["sends"], keywords["rows"][0]["clicks"]) == (300, 60) and "快抢" in items
    assert "name" not in items
    shared = next(r for r in keywords["rows"] if r["item"] == "购物")
    assert (shared["sends"], shared["clicks"]) == (600, 75)
    top = _loopcast(env, "copy", "insights", "--kind", "template", "--campaign", "cart", "--limit", "1").stdout
    assert "copy_knowledge" in top and "hot" in top and "cold" not in top and "█" in top
