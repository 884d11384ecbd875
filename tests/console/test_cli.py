"""CLI input validation: bad files are refused with line numbers before anything reaches Kafka."""

from __future__ import annotations

import json

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


def test_render_previews_a_channel(tmp_path) -> None:
    import json

    (tmp_path / "t.yaml").write_text('title: "${name}"\nbody: "${name}，<#if stock < 5>只剩${stock}件</#if>"\n')
    (tmp_path / "p.json").write_text('{"user_id": "u1", "name": "小红"}')
    (tmp_path / "e.json").write_text('{"stock": 3}')
    args = [
        "render",
        str(tmp_path / "t.yaml"),
        "--profile",
        str(tmp_path / "p.json"),
        "--event",
        str(tmp_path / "e.json"),
    ]
    result = runner.invoke(app, [*args, "--channel", "sms-cn", "--brand", "Loopcast"])
    assert result.exit_code == 0, result.output
    adapted = json.loads(result.output)
    assert adapted["body"].startswith("【Loopcast】小红，只剩3件") and adapted["extra"]["encoding"] == "UCS-2"
    assert runner.invoke(app, [*args, "--channel", "pigeon"]).exit_code == 1


def test_render_reports_authoring_errors_with_position(tmp_path) -> None:
    (tmp_path / "t.yaml").write_text('body: "Hi <#if name??>${name}"\n')
    (tmp_path / "p.json").write_text("{}")
    result = runner.invoke(
        app, ["render", str(tmp_path / "t.yaml"), "--profile", str(tmp_path / "p.json"), "--channel", "sms"]
    )
    assert result.exit_code == 1 and "line 1, column" in result.output


# (exposures and clicks per variant, deadline passed, expected status, winner)
DECISIONS = [
    ([(5000, 250), (5000, 400)], False, "winner", "b"),
    ([(300, 15), (300, 30)], False, "continue", None),
    ([(300, 15), (300, 16)], True, "fallback", "a"),
]


@pytest.mark.parametrize(("numbers", "deadline", "status", "winner"), DECISIONS)
def test_ab_decide(tmp_path, numbers, deadline, status, winner) -> None:
    import json

    stats = [{"variant": v, "exposures": e, "clicks": c} for v, (e, c) in zip("ab", numbers, strict=True)]
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"experiment": {"fallback": "a"}, "stats": stats, "deadline_passed": deadline}))
    result = runner.invoke(app, ["ab", "decide", "--stats", str(path)])
    assert result.exit_code == 0, result.output
    decision = json.loads(result.output)
    assert (decision["status"], decision["winner"]) == (status, winner) and decision["reason"]


def test_segment_compile_prints_each_dialect_and_refuses_bad_trees(tmp_path) -> None:
    segment = {
        "id": "deal-hunters",
        "name": "price-sensitive in Hangzhou",
        "root": {"type": "and", "nodes": [
            {"type": "has_tag", "tag": "price_sensitive"},
            {"type": "attribute", "name": "city", "op": "=", "value": "Hangzhou"},
        ]},
    }  # fmt: skip
    path = tmp_path / "segment.json"
    path.write_text(json.dumps(segment))
    clickhouse = runner.invoke(app, ["segment", "compile", str(path), "--dialect", "clickhouse"])
    spark = runner.invoke(app, ["segment", "compile", str(path), "--dialect", "spark", "--count"])
    assert clickhouse.exit_code == 0 and clickhouse.stdout.startswith("SELECT user_id FROM user_attributes")
    assert spark.exit_code == 0 and "COUNT(*) AS users" in spark.stdout and "'price_sensitive'" in spark.stdout
    segment["root"]["nodes"][1]["name"] = "password"
    path.write_text(json.dumps(segment))
    refused = runner.invoke(app, ["segment", "compile", str(path)])
    assert refused.exit_code == 1 and "unknown attribute 'password'" in refused.stderr


def test_channels_list_names_every_provider_with_its_abilities() -> None:
    from connectors.channels.base import REGISTRY

    listed = json.loads(runner.invoke(app, ["channels", "list", "--format", "json"]).stdout)
    assert {row["scheme"] for row in listed} == set(REGISTRY) and len(listed) >= 23
    twilio = next(row for row in listed if row["scheme"] == "twilio")
    assert twilio["channel_kind"] == "sms" and twilio["sends_receipts"] and "auth_token" in twilio["credentials"]
