"""`loopcast copy generate`: offline copy marked as such, bad briefs refused; against the stack's LLM sandbox, the copy
published as templates and A/B variants of a campaign on the config topic; the worker's POST /v1/copy/generate."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from console.cli import app
from schemas.config import Campaign, Template
from streams.copy.generate import check

runner = CliRunner()

BRIEF = {
    "product": {"name": "Loopcast 降噪耳机 Pro", "price": "299", "selling_points": ["40 小时续航", "主动降噪"]},
    "campaign": {"goal": "清库存", "phase": "peak", "offer": "满300减50", "tone": "活泼", "language": "zh"},
    "persona": "25-35 岁通勤白领",
    "fields": ["name", "product_name", "stock"],
    "channels": ["sms-cn", "push-fcm", "email"],
    "variants": 3,
}


def brief_file(tmp_path, **changes):
    path = tmp_path / "brief.yaml"
    path.write_text(yaml.safe_dump({**BRIEF, **changes}, allow_unicode=True))
    return path


@pytest.mark.unit
def test_offline_copy_is_marked_and_checked(tmp_path) -> None:
    from streams.copy.generate import CopyBrief, CopyBundle

    result = runner.invoke(app, ["copy", "generate", str(brief_file(tmp_path)), "--variants", "2", "--format", "json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["source"] == "offline" and len(out["accepted"]) == 2 and out["published"] == []
    brief = CopyBrief.model_validate({**BRIEF, "variants": 2})
    assert all(check(CopyBundle.model_validate(c["bundle"]), brief) == [] for c in out["accepted"])
    table = runner.invoke(app, ["copy", "generate", str(brief_file(tmp_path))])
    assert (
        table.exit_code == 0
        and "offline fallback writer" in table.output
        and "3 variant(s) from offline" in table.output
    )


@pytest.mark.unit
def test_bad_briefs_are_refused(tmp_path) -> None:
    result = runner.invoke(app, ["copy", "generate", str(brief_file(tmp_path, channels=["pigeon"]))])
    assert result.exit_code == 1 and "pigeon" in result.output
    result = runner.invoke(app, ["copy", "generate", str(brief_file(tmp_path)), "--publish"])
    assert result.exit_code == 1 and "--campaign" in result.output


@pytest.mark.integration
def test_generated_copy_joins_a_campaigns_ab_test(local_stack, stack_env, tmp_path) -> None:
    from connectors.channels.sandboxes.core import Faults
    from console.audience_cli import config_from_topic

    campaign = {
        "kind": "campaign",
        "id": "gen-c1",
        "name": "Generated copy",
        "trigger": {"event_type": "cart_abandoned"},
        "channel": "sms-cn",
        "template_id": "gen-t-hand",
    }
    template = {
        "kind": "template",
        "id": "gen-t-hand",
        "body": "${name}，购物车等你",
        "link": "https://shop.example.com/c",
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump_all([template, campaign], allow_unicode=True))
    assert runner.invoke(app, ["config", "apply", str(config)]).exit_code == 0
    sandbox = stack_env.sandbox_base
    httpx.post(f"{sandbox}/_sandbox/llm/reset")
    httpx.post(f"{sandbox}/_sandbox/llm/faults", json={**Faults().model_dump(), "malformed_rate": 0.3, "seed": 2})

    env = {"LOOPCAST_LLM_BASE_URL": f"{sandbox}/llm/v1", "LOOPCAST_LLM_OUTPUT_MODE": "tools"}
    args = ["copy", "generate", str(brief_file(tmp_path)), "--publish", "--campaign", "gen-c1", "--format", "json"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["source"] == "llm:gpt-4o-mini" and len(out["accepted"]) == 3
    assert out["published"] == [
        "template:gen-c1.gen-2-1",
        "template:gen-c1.gen-2-2",
        "template:gen-c1.gen-2-3",
        "campaign:gen-c1",
    ]
    requests = httpx.get(f"{sandbox}/_sandbox/llm/requests").json()
    assert requests["total"] >= 3 and all(r["body"]["tools"] for r in requests["items"])

    store = asyncio.run(config_from_topic(stack_env))
    updated = store.campaign("gen-c1")
    assert isinstance(updated, Campaign) and updated.version == 2 and updated.template_id is None
    assert [(v.id, v.template_id) for v in updated.variants] == [
        ("a", "gen-t-hand"),
        ("gen-2-1", "gen-c1.gen-2-1"),
        ("gen-2-2", "gen-c1.gen-2-2"),
        ("gen-2-3", "gen-c1.gen-2-3"),
    ]
    for i, accepted in enumerate(out["accepted"]):
        generated = store.template(f"gen-c1.gen-2-{i + 1}")
        assert isinstance(generated, Template) and generated.body == accepted["bundle"]["short_text"]
        assert generated.link == "https://shop.example.com/c"  # the campaign's link, not the writer's
        assert generated.source == "llm:gpt-4o-mini"


@pytest.mark.integration
def test_the_worker_generates_copy_over_http(worker) -> None:
    answer = httpx.post(f"{worker.http_base}/v1/copy/generate", json={**BRIEF, "variants": 2}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["source"] == "offline" and len(body["accepted"]) == 2  # the test stack sets no LLM endpoint
    refused = httpx.post(f"{worker.http_base}/v1/copy/generate", json={**BRIEF, "channels": []}, timeout=60)
    assert refused.status_code == 400 and refused.json()["errors"][0]["loc"] == ["channels"]
