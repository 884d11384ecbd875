"""The stack launcher's pure parts: generated configs, pid-file identity, the jar cache, waiting."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from infra import stack as stack_mod
from infra.settings import Settings
from infra.stack import (
    JARS_COMPLETE_MARKER,
    PidRecord,
    Stack,
    StackError,
    ensure_kafka_jars,
    ensure_system_packages,
    kafka_broker_ready,
    kafka_cluster_id,
    log4j2_properties,
    parse_properties,
    parse_stat,
    proc_stat,
    read_pid_file,
    server_properties,
    settings_env,
    write_pid_file,
)
from infra.waiting import wait_for, wait_for_async

pytestmark = pytest.mark.unit


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        jar_cache=tmp_path / "jars",
        kafka_port=29192,
        kafka_controller_port=29193,
        redis_port=26479,
        partitions=3,
        kafka_bootstrap=None,
        redis_url=None,
    )


# ---- generated configuration -------------------------------------------------------------------


def test_server_properties_is_a_single_kraft_node(settings: Settings) -> None:
    props = parse_properties(server_properties(settings))
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:29193"
    assert "controller.quorum.voters" not in props  # conflicts with `format --standalone`
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29192,CONTROLLER://127.0.0.1:29193"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:29192"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert Path(props["log.dirs"]) == settings.home / "kafka" / "data"
    assert props["num.partitions"] == "3"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "false"


def test_log4j2_properties_write_info_to_kafka_server_log(settings: Settings) -> None:
    props = parse_properties(log4j2_properties(settings))
    assert Path(props["appender.server.fileName"]) == settings.log_dir / "kafka-server.log"
    assert props["rootLogger.level"] == "INFO"
    assert props["rootLogger.appenderRef.server.ref"] == props["appender.server.name"]


def test_cluster_id_looks_like_kafka_uuid() -> None:
    for _ in range(200):
        cid = kafka_cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_split_bootstrap() -> None:
    assert stack_mod._split_bootstrap("a:1, b:2") == [("a", 1), ("b", 2)]
    assert stack_mod._split_bootstrap("PLAINTEXT://k:9092") == [("k", 9092)]


def test_broker_probe_on_closed_port_is_false_fast() -> None:
    assert kafka_broker_ready("127.0.0.1", 1, timeout_s=0.5) is False


def test_settings_env_round_trips(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("LOOPCAST_")]:
        monkeypatch.delenv(key)
    env = settings_env(settings)
    assert env["LOOPCAST_KAFKA_PORT"] == "29192" and env["LOOPCAST_KAFKA_BOOTSTRAP"] is None
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    assert Settings() == settings


# ---- pid files and process identity ------------------------------------------------------------


def test_parse_stat_survives_odd_command_names() -> None:
    fields = ["S"] + ["0"] * 18 + ["4242"] + ["0"] * 10
    assert parse_stat("77 (a) b (c)) " + " ".join(fields)) == ("S", 4242)


def test_own_process_identity() -> None:
    me = PidRecord.of(os.getpid(), ["pytest"])
    assert me is not None and me.is_alive()
    assert proc_stat(os.getpid())[1] == me.start_time  # type: ignore[index]
    # Same pid, other start time: a recycled pid is never "ours".
    assert not PidRecord(me.pid, me.start_time + 1, me.boot_id).is_alive()
    # Same pid and start time, but recorded before another boot.
    assert not PidRecord(me.pid, me.start_time, "another-boot").is_alive()


def test_zombie_counts_as_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    record = PidRecord.of(proc.pid)
    assert record is not None
    # Not polled, so it lingers as a zombie; is_alive must say no (and reap it).
    wait_for(lambda: not record.is_alive(), 10, what="child to exit")
    assert proc_stat(proc.pid) is None or proc_stat(proc.pid)[1] != record.start_time  # type: ignore[index]


def test_pid_file_round_trip_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "run" / "x.pid"
    record = PidRecord.of(os.getpid(), ["a", "b c"])
    assert record is not None
    write_pid_file(path, record)
    assert read_pid_file(path) == record
    path.write_text("12345\n")  # a bare pid proves nothing: not trusted
    assert read_pid_file(path) is None
    assert read_pid_file(tmp_path / "missing.pid") is None


def test_down_never_kills_a_recycled_pid(settings: Settings) -> None:
    me = PidRecord.of(os.getpid())
    assert me is not None
    impostor = settings.run_dir / "impostor.pid"
    write_pid_file(impostor, PidRecord(me.pid, me.start_time + 1, me.boot_id))
    stack = Stack(settings)
    assert next(s for s in stack.status() if s.name == "impostor").running is False
    stack.down()  # would SIGTERM this very test process if identity were not checked
    assert not impostor.exists()


def test_down_stops_a_recorded_process_and_its_group(settings: Settings) -> None:
    # A parent that starts a child in the same (new) session: down() must end both.
    code = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        wait_for(lambda: _children(proc.pid), 10, what="grandchild to start")
        child = _children(proc.pid)[0]
        write_pid_file(settings.run_dir / "sleeper.pid", PidRecord.of(proc.pid))  # type: ignore[arg-type]
        child_record = PidRecord.of(child)
        assert child_record is not None
        Stack(settings).down()
        proc.wait(timeout=10)
        wait_for(lambda: not child_record.is_alive(), 10, what="grandchild to exit")
        assert not (settings.run_dir / "sleeper.pid").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


# ---- stack API edges ---------------------------------------------------------------------------


def test_unknown_service_fails_before_starting_anything(settings: Settings) -> None:
    with pytest.raises(StackError, match="unknown service 'nope'"):
        Stack(settings).up(["redis", "nope"])
    assert not (settings.run_dir / "redis.pid").exists()


def test_builtin_names_cannot_be_registered(settings: Settings) -> None:
    with pytest.raises(ValueError):
        Stack(settings).register("kafka", ["true"], lambda: True)


def test_external_services_are_reported_not_managed(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:1/0")
    by_name = {s.name: s for s in Stack(settings).status()}
    assert by_name["kafka"].external and by_name["kafka"].address == "127.0.0.1:1"
    assert by_name["redis"].external and by_name["redis"].address == "redis://127.0.0.1:1/0"
    assert not by_name["kafka"].healthy and by_name["kafka"].pid is None


# ---- system packages and the jar cache ----------------------------------------------------------


def test_ensure_system_packages_is_noop_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_mod.shutil, "which", lambda name: f"/bin/{name}")
    monkeypatch.setattr(stack_mod.subprocess, "run", _must_not_run)
    ensure_system_packages()


def test_ensure_system_packages_explains_without_apt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_mod.shutil, "which", lambda name: None)
    with pytest.raises(StackError, match="apt-get install -y redis-server"):
        ensure_system_packages(["redis-server"])


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"unexpected subprocess.run{args}")


def test_cached_jars_are_reused(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    target = settings.jar_cache / f"kafka-{settings.kafka_version}"
    target.mkdir(parents=True)
    (target / JARS_COMPLETE_MARKER).write_text("")
    monkeypatch.setattr(stack_mod.subprocess, "run", _must_not_run)
    assert ensure_kafka_jars(settings) == target


def _fake_mvn(ok: bool, calls: list[list[str]]):
    def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        out = Path(next(a for a in argv if a.startswith("-DoutputDirectory=")).split("=", 1)[1])
        version = next(a for a in argv if a.startswith("-Dkafka.version=")).split("=", 1)[1]
        out.mkdir(parents=True, exist_ok=True)
        (out / "kafka-clients.jar").write_text("")
        if ok:
            (out / f"kafka_2.13-{version}.jar").write_text("")
        return subprocess.CompletedProcess(argv, 0 if ok else 1, "", "" if ok else "network down")

    return run


def test_half_download_is_redone(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    target = settings.jar_cache / f"kafka-{settings.kafka_version}"
    target.mkdir(parents=True)
    (target / "truncated.jar").write_text("")  # no marker: an interrupted earlier download
    calls: list[list[str]] = []
    monkeypatch.setattr(stack_mod, "ensure_system_packages", lambda *a, **k: None)
    monkeypatch.setattr(stack_mod.subprocess, "run", _fake_mvn(True, calls))
    assert ensure_kafka_jars(settings) == target
    assert len(calls) == 1 and "-Dkafka.version=4.3.1" in calls[0]
    assert (target / JARS_COMPLETE_MARKER).exists()
    assert not (target / "truncated.jar").exists()
    assert sorted(p.name for p in settings.jar_cache.iterdir()) == [target.name]


def test_failed_download_leaves_no_cache(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_mod, "ensure_system_packages", lambda *a, **k: None)
    monkeypatch.setattr(stack_mod.subprocess, "run", _fake_mvn(False, []))
    with pytest.raises(StackError, match="network down"):
        ensure_kafka_jars(settings)
    assert list(settings.jar_cache.iterdir()) == []


# ---- waiting -----------------------------------------------------------------------------------


def test_wait_for_returns_the_truthy_value() -> None:
    values = iter([None, 0, "ready"])
    assert wait_for(lambda: next(values), 5, interval_s=0.001) == "ready"


def test_wait_for_times_out_naming_what() -> None:
    with pytest.raises(TimeoutError, match="waiting for the moon"):
        wait_for(lambda: False, 0.05, interval_s=0.01, what="the moon")


def test_wait_for_ignores_listed_errors_and_quotes_the_last() -> None:
    def boom() -> bool:
        raise ConnectionError("refused")

    with pytest.raises(TimeoutError, match="refused"):
        wait_for(boom, 0.05, interval_s=0.01, ignore=(ConnectionError,))
    with pytest.raises(KeyError):
        wait_for(lambda: {}["x"], 1, ignore=(ConnectionError,))


def test_wait_for_async_accepts_sync_and_async_predicates() -> None:
    async def main() -> None:
        hits = iter([False, True])

        async def ready() -> bool:
            return next(hits)

        assert await wait_for_async(ready, 5, interval_s=0.001) is True
        assert await wait_for_async(lambda: 7, 5) == 7
        with pytest.raises(TimeoutError, match="nothing"):
            await wait_for_async(lambda: None, 0.05, interval_s=0.01, what="nothing")

    asyncio.run(main())
