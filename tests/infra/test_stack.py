"""The real local stack: Kafka and Redis started, used, inspected and stopped by infra.stack.

Runs in a temporary LOOPCAST_HOME on ports of its own (Kafka 29192/29193, Redis 26479, a helper
process on 26480) so it never meets another stack on the machine. The Kafka jars come from the
shared jar cache (resolved with mvn on the first run ever).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from infra import topics
from infra.settings import Settings
from infra.stack import KAFKA, REDIS, PidRecord, Stack, StackError, _port_open, read_pid_file, write_pid_file
from infra.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KAFKA_PORT, CONTROLLER_PORT, REDIS_PORT, HELPER_PORT = 29192, 29193, 26479, 26480
PARTITIONS = 3  # not the default, so the test sees the setting reach the topics

if not (shutil.which("java") and shutil.which("redis-server")):
    pytest.skip("needs java and redis-server on PATH", allow_module_level=True)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        home=tmp_path_factory.mktemp("loopcast-home"),
        kafka_port=KAFKA_PORT,
        kafka_controller_port=CONTROLLER_PORT,
        redis_port=REDIS_PORT,
        partitions=PARTITIONS,
        kafka_bootstrap=None,
        redis_url=None,
    )


@pytest.fixture(scope="module")
def stack(settings: Settings):
    for port in (KAFKA_PORT, CONTROLLER_PORT, REDIS_PORT, HELPER_PORT):
        if _port_open("127.0.0.1", port):
            pytest.skip(f"port {port} is taken by something else")
    st = Stack(settings, progress=lambda msg: print(f"stack: {msg}"))
    started = time.monotonic()
    try:
        st.up()
        print(f"stack: cold up() took {time.monotonic() - started:.1f}s")
        yield st
    finally:
        st.down()


def _pids(settings: Settings) -> dict[str, int]:
    out = {}
    for path in settings.run_dir.glob("*.pid"):
        record = read_pid_file(path)
        assert record is not None, path
        out[path.stem] = record.pid
    return out


def test_up_twice_is_harmless(stack: Stack, settings: Settings) -> None:
    before = _pids(settings)
    assert set(before) == {KAFKA, REDIS}
    started = time.monotonic()
    stack.up()
    assert time.monotonic() - started < 10
    assert _pids(settings) == before


def test_topics_exist_with_partitions_and_config(stack: Stack, settings: Settings) -> None:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    async def inspect():
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics([t.name for t in topics.ALL])
            configs = await admin.describe_configs(
                [
                    ConfigResource(ConfigResourceType.TOPIC, topics.CONFIG.name),
                    ConfigResource(ConfigResourceType.TOPIC, topics.EVENTS.name),
                ]
            )
            return described, configs
        finally:
            await admin.close()

    described, responses = asyncio.run(inspect())
    partitions = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
    assert partitions == {t.name: t.partitions or PARTITIONS for t in topics.ALL}
    assert partitions[topics.DLQ.name] == 1

    found: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            found[resource["resource_name"]] = {
                c["config_names"]: c["config_value"] for c in resource["config_entries"]
            }
    assert found[topics.CONFIG.name]["cleanup.policy"] == "compact"
    assert found[topics.EVENTS.name]["cleanup.policy"] == "delete"
    assert found[topics.EVENTS.name]["retention.ms"] == topics.EVENTS.config["retention.ms"]


def test_produce_consume_round_trip(stack: Stack, settings: Settings) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    payload = uuid.uuid4().hex.encode()

    async def round_trip() -> bytes:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
        await producer.start()
        try:
            meta = await producer.send_and_wait(topics.EVENTS.name, payload, key=b"user-1")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topics.EVENTS.name, meta.partition)
            consumer.assign([tp])
            consumer.seek(tp, meta.offset)
            record = await asyncio.wait_for(consumer.getone(), timeout=20)
            return record.value
        finally:
            await consumer.stop()

    assert asyncio.run(round_trip()) == payload

    import redis

    client = redis.Redis.from_url(settings.redis)
    try:
        client.set("loopcast:test", payload)
        assert client.get("loopcast:test") == payload
    finally:
        client.close()


def test_status_reports_healthy(stack: Stack, settings: Settings) -> None:
    by_name = {s.name: s for s in stack.status()}
    pids = _pids(settings)
    kafka, red = by_name[KAFKA], by_name[REDIS]
    assert (kafka.pid, kafka.running, kafka.healthy, kafka.external) == (pids[KAFKA], True, True, False)
    assert (red.pid, red.running, red.healthy, red.external) == (pids[REDIS], True, True, False)
    assert kafka.address == f"127.0.0.1:{KAFKA_PORT}"
    assert red.address == f"redis://127.0.0.1:{REDIS_PORT}/0"


def test_registered_process(stack: Stack, settings: Settings) -> None:
    stack.register(
        "helper",
        [sys.executable, "-m", "http.server", str(HELPER_PORT), "--bind", "127.0.0.1"],
        health=lambda: _port_open("127.0.0.1", HELPER_PORT),
        env={"PYTHONUNBUFFERED": "1"},
        timeout_s=30,
    )
    stack.up([KAFKA, REDIS, "helper"])
    record = read_pid_file(settings.run_dir / "helper.pid")
    assert record is not None and record.is_alive()
    assert os.getpgid(record.pid) == record.pid  # its own session and process group
    assert (settings.log_dir / "helper.log").exists()
    # Managed processes see the stack's settings, not the defaults, plus their own env.
    environ = dict(
        item.split("=", 1) for item in Path(f"/proc/{record.pid}/environ").read_text().split("\0") if "=" in item
    )
    assert environ["LOOPCAST_KAFKA_PORT"] == str(KAFKA_PORT)
    assert environ["LOOPCAST_HOME"] == str(settings.home)
    assert environ["PYTHONUNBUFFERED"] == "1"
    assert {s.name: s.healthy for s in stack.status()}["helper"] is True

    stack.register(
        "broken",
        [sys.executable, "-c", "import sys; print('boom: no config', flush=True); sys.exit(3)"],
        health=lambda: False,
        timeout_s=20,
    )
    with pytest.raises(StackError) as failure:
        stack.up(["broken"])
    assert "code 3" in str(failure.value) and "boom: no config" in str(failure.value)
    assert not (settings.run_dir / "broken.pid").exists()


def test_stale_pid_file_is_replaced(stack: Stack, settings: Settings) -> None:
    pid_file = settings.run_dir / "redis.pid"
    old = read_pid_file(pid_file)
    assert old is not None
    os.kill(old.pid, signal.SIGKILL)  # redis dies behind the stack's back
    wait_for(lambda: not old.is_alive(), 10, what="redis to die")
    # The process can be gone a moment before the kernel has closed its listening socket.
    wait_for(lambda: not _port_open("127.0.0.1", REDIS_PORT), 10, what="redis's port to close")
    assert pid_file.exists()

    stack.up([REDIS])
    new = read_pid_file(pid_file)
    assert new is not None and new.pid != old.pid and new.is_alive()
    assert {s.name: s.healthy for s in stack.status()}[REDIS] is True


def test_down_stops_exactly_ours(stack: Stack, settings: Settings) -> None:
    records = {p.stem: read_pid_file(p) for p in settings.run_dir.glob("*.pid")}
    assert set(records) >= {KAFKA, REDIS}
    # A pid file whose pid now belongs to someone else (this test process) must not be acted on.
    me = PidRecord.of(os.getpid())
    assert me is not None
    write_pid_file(settings.run_dir / "recycled.pid", PidRecord(me.pid, me.start_time + 1, me.boot_id))

    started = time.monotonic()
    stack.down()
    print(f"stack: down() took {time.monotonic() - started:.1f}s")

    assert all(not r.is_alive() for r in records.values() if r is not None)
    assert list(settings.run_dir.glob("*.pid")) == []
    assert _processes_mentioning(str(settings.home)) == []
    for port in (KAFKA_PORT, CONTROLLER_PORT, REDIS_PORT, HELPER_PORT):
        assert not _port_open("127.0.0.1", port), port
    assert all(not s.running for s in stack.status())
    stack.down()  # nothing left: a no-op


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found
