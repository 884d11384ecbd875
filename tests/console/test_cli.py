"""CLI input validation: bad files are refused with line numbers before anything reaches Kafka."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from console.cli import app

pytestmark = pytest.mark.unit
runner = CliRunner()


def test_produce_refuses_invalid_events_with_line_numbers(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"event_id": "e1", "event_type": "t", "user_id": "u", "occurred_at": "2026-01-01T00:00:00Z"}\n'
        '{"event_id": "e2", "event_type": "t"}\n'
        "not json\n"
    )
    result = runner.invoke(app, ["produce", str(path)])
    assert result.exit_code == 1
    assert "line 2" in result.output and "line 3" in result.output and "nothing was produced" in result.output


def test_config_apply_refuses_an_invalid_campaign(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kind: campaign\nid: c1\nname: C\nchannel: webhook\n")
    result = runner.invoke(app, ["config", "apply", str(path)])
    assert result.exit_code == 1 and "trigger" in result.output


def test_worker_refuses_unknown_stages() -> None:
    result = runner.invoke(app, ["worker", "--stages", "match,telepathy"])
    assert result.exit_code == 1 and "telepathy" in result.output
