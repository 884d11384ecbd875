"""The delivery-rate monitor on the real stack: steady traffic through a webhook channel, then the
provider reports most messages undelivered — one drop alert in loopcast.alerts, in ClickHouse and
at the operators' WeCom bot within 60 s, nothing more while it stays down, and a recovery alert
once it is healthy again."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from connectors import warehouse
from console.alert_demo import ProviderFailure
from console.reports import alerts_report
from infra.waiting import wait_for
from streams.monitor import DROP, RECOVERED

pytestmark = pytest.mark.e2e


def stored(wh, alert_id: str) -> list[dict]:
    return [r for r in alerts_report(wh, hours=1, limit=1000) if r["alert_id"] == alert_id]


def test_a_failing_provider_raises_one_alert_then_a_recovery(worker) -> None:
    settings = worker
    scenario = ProviderFailure(settings, prefix="mon-e2e", rate_per_s=10)
    scenario.setup()
    scenario.start_traffic()
    wh = warehouse.connect(settings)
    try:
        scenario.wait_for_baseline(timeout_s=180)
        assert scenario.alerts() == []  # normal traffic: nothing to say
        scenario.fail(undelivered_rate=0.8)
        failed_at = time.monotonic()
        drop = scenario.wait_for_alert(DROP, timeout_s=60)
        assert time.monotonic() - failed_at < 60
        # The rate when it fired: below the baseline (100 %) by more than the margin, and deep enough to be critical.
        margin = settings.monitor.margin
        assert drop.severity.value == "critical" and drop.value is not None and drop.value < 1 - margin
        assert "dropped from 100.0% to" in drop.message
        wait_for(lambda: stored(wh, drop.alert_id), timeout_s=60, what="the alert in ClickHouse")
        report = subprocess.run(
            [sys.executable, "-m", "console", "report", "alerts", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert report.returncode == 0, report.stderr
        assert drop.alert_id in {row["alert_id"] for row in json.loads(report.stdout)}
        wait_for(lambda: scenario.operator_texts(), timeout_s=60, what="the alert at the WeCom bot")
        assert drop.message in scenario.operator_texts()[0]
        # Down for longer than the window and past several evaluations: still the one alert.
        sent_before = scenario.delivered_to_provider()
        wait_for(
            lambda: scenario.delivered_to_provider() >= sent_before + 20 * settings.monitor.window_s,
            timeout_s=120,
            what="two windows more of failing traffic",
        )
        assert [a.alert_id for a in scenario.alerts(DROP)] == [drop.alert_id]
        scenario.heal()
        recovered = scenario.wait_for_alert(RECOVERED, timeout_s=90)
        assert recovered.alert_id == drop.alert_id.replace(DROP, RECOVERED, 1)
        wait_for(lambda: len(scenario.operator_texts()) == 2, timeout_s=60, what="the recovery")
        assert len(scenario.alerts(DROP)) == 1
    finally:
        scenario.heal()
        scenario.stop_traffic()
        wh.close()
