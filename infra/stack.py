"""The local stack: a single-node KRaft Kafka broker, Redis, and any registered Loopcast process.

Everything runs as plain child processes of the machine, no containers:

* Kafka: the broker jars are resolved once per version from Maven Central with `mvn` (see
  infra/kafka/pom.xml) into `settings.jar_cache/kafka-<version>`, then `kafka.Kafka` is started on a
  generated `server.properties` and `log4j2.properties` under `settings.kafka_dir`.
* Redis: the system `redis-server`, state under `<home>/redis`.
* Registered processes (`Stack.register`): e.g. the sandbox and the worker.

Every process is started in its own session, logs under `settings.log_dir` and is recorded in a pid
file under `settings.run_dir` holding its pid *and* its kernel start time, so `down()` stops exactly
what `up()` started and never a process that merely inherited a recycled pid.

When `settings.kafka_bootstrap` / `settings.redis_url` are set, that service is external: it is never
started or stopped here, only health-checked (and, for Kafka, given the topics it lacks).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infra import topics as topic_specs
from infra.settings import Settings
from infra.waiting import wait_for, wait_for_async

KAFKA = "kafka"
REDIS = "redis"
BUILTIN = (KAFKA, REDIS)

POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
JARS_COMPLETE_MARKER = ".complete"
LOG_TAIL_LINES = 20

# binary -> Debian package that provides it
SYSTEM_PACKAGES = {"java": "openjdk-17-jre-headless", "mvn": "maven", "redis-server": "redis-server"}

Progress = Callable[[str], None]


class StackError(RuntimeError):
    """The local stack could not be brought to the requested state."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    address: str
    external: bool = False


def _noop(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# System packages


_apt_updated = False


def ensure_system_packages(binaries: Sequence[str] | None = None, progress: Progress | None = None) -> None:
    """Install (with apt) the Debian packages providing any of `binaries` that are missing.

    A no-op when every binary is already on PATH. `binaries` defaults to java, mvn and redis-server.
    """
    global _apt_updated
    progress = progress or _noop
    wanted = list(binaries) if binaries is not None else list(SYSTEM_PACKAGES)
    missing = [b for b in wanted if shutil.which(b) is None]
    if not missing:
        return
    packages = sorted({SYSTEM_PACKAGES[b] for b in missing})
    hint = f"install them first: apt-get install -y {' '.join(packages)}"
    if shutil.which("apt-get") is None:
        raise StackError(f"missing {', '.join(missing)} and apt-get is not available; {hint}")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise StackError(f"missing {', '.join(missing)} and not running as root; {hint}")
        prefix = ["sudo", "-n", "env", "DEBIAN_FRONTEND=noninteractive"]  # sudo resets the environment
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def run(argv: list[str]) -> None:
        proc = subprocess.run(prefix + argv, check=False, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise StackError(f"`{shlex.join(prefix + argv)}` failed ({proc.returncode}); {hint}\n{tail}")

    if not _apt_updated:
        progress("apt-get update")
        run(["apt-get", "update"])
        _apt_updated = True
    progress(f"apt-get install {' '.join(packages)}")
    run(["apt-get", "install", "-y", "--no-install-recommends", *packages])
    still = [b for b in missing if shutil.which(b) is None]
    if still:
        raise StackError(f"{', '.join(still)} still not on PATH after installing {' '.join(packages)}")


# --------------------------------------------------------------------------------------------------
# Process identity and pid files


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def parse_stat(raw: str) -> tuple[str, int]:
    """(state, start time) from the text of /proc/<pid>/stat."""
    # The command name (field 2) is in parentheses and may itself contain spaces or parentheses.
    rest = raw[raw.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field 22 (starttime, clock ticks since boot) is rest[19].
    return rest[0], int(rest[19])


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, or None if there is no such pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return parse_stat(raw)


@dataclass(frozen=True)
class PidRecord:
    """What a pid file holds: enough to tell our process from a stranger with a recycled pid."""

    pid: int
    start_time: int
    boot_id: str
    argv: list[str] = field(default_factory=list)
    started_at: str = ""

    @classmethod
    def of(cls, pid: int, argv: Sequence[str] = ()) -> PidRecord | None:
        stat = proc_stat(pid)
        if stat is None:
            return None
        return cls(pid, stat[1], _boot_id(), list(argv), datetime.now(UTC).isoformat(timespec="seconds"))

    def is_alive(self) -> bool:
        """True only if this very process (same pid, start time and boot) still runs (zombies don't)."""
        if self.boot_id and self.boot_id != _boot_id():
            return False
        stat = proc_stat(self.pid)
        if stat is None or stat[1] != self.start_time:
            return False
        if stat[0] in ("Z", "X"):
            _reap(self.pid)
            return False
        return True

    def to_json(self) -> str:
        return json.dumps(
            {
                "pid": self.pid,
                "start_time": self.start_time,
                "boot_id": self.boot_id,
                "argv": self.argv,
                "started_at": self.started_at,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PidRecord:
        data = json.loads(text)
        return cls(
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            boot_id=str(data.get("boot_id", "")),
            argv=list(data.get("argv", [])),
            started_at=str(data.get("started_at", "")),
        )


def _reap(pid: int) -> None:
    """Collect the exit status of a dead child of ours, if it is one, so it stops being a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def read_pid_file(path: Path) -> PidRecord | None:
    """The record in `path`, or None if the file is missing or unreadable (which is never trusted)."""
    try:
        return PidRecord.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_pid_file(path: Path, record: PidRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(record.to_json() + "\n")
    os.replace(tmp, path)


def tail_lines(paths: Sequence[Path], n: int = LOG_TAIL_LINES) -> str:
    """The last `n` lines of each existing file in `paths`, labelled, for error messages."""
    chunks = []
    for path in paths:
        try:
            with path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 64 * 1024))
                lines = fh.read().decode("utf-8", "replace").splitlines()[-n:]
        except OSError:
            continue
        chunks.append(f"--- last {len(lines)} lines of {path} ---\n" + "\n".join(lines))
    return "\n".join(chunks) if chunks else "(no log output)"


# --------------------------------------------------------------------------------------------------
# Kafka: jars, configuration, storage, health


def kafka_jar_dir(settings: Settings) -> Path:
    return settings.jar_cache / f"kafka-{settings.kafka_version}"


def kafka_jars_ready(settings: Settings) -> bool:
    return (kafka_jar_dir(settings) / JARS_COMPLETE_MARKER).exists()


def ensure_kafka_jars(settings: Settings, progress: Progress | None = None) -> Path:
    """The directory holding the broker's jars, resolving them with Maven on first use.

    Jars are downloaded into a scratch directory which is renamed into place with its completion
    marker already inside, so an interrupted download is never mistaken for a finished one.
    """
    progress = progress or _noop
    target = kafka_jar_dir(settings)
    if (target / JARS_COMPLETE_MARKER).exists():
        return target
    ensure_system_packages(["mvn"], progress)
    settings.jar_cache.mkdir(parents=True, exist_ok=True)
    scratch = settings.jar_cache / f".kafka-{settings.kafka_version}.{os.getpid()}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    progress(f"kafka: resolving Kafka {settings.kafka_version} jars from Maven Central")
    argv = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={scratch}",
        f"-Dkafka.version={settings.kafka_version}",
    ]
    try:
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise StackError(f"`{shlex.join(argv)}` did not finish within 900s") from exc
    broker_jar = scratch / f"kafka_2.13-{settings.kafka_version}.jar"
    if proc.returncode != 0 or not broker_jar.exists():
        shutil.rmtree(scratch, ignore_errors=True)
        out = "\n".join((proc.stdout + proc.stderr).splitlines()[-LOG_TAIL_LINES:])
        raise StackError(f"resolving the Kafka jars failed ({proc.returncode}): {shlex.join(argv)}\n{out}")
    jars = sorted(p.name for p in scratch.glob("*.jar"))
    (scratch / JARS_COMPLETE_MARKER).write_text("\n".join(jars) + "\n")
    if target.exists():  # a half download from before the marker existed, or a lost race
        if (target / JARS_COMPLETE_MARKER).exists():
            shutil.rmtree(scratch, ignore_errors=True)
            return target
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(scratch, target)
    except OSError:
        if not (target / JARS_COMPLETE_MARKER).exists():
            raise
        shutil.rmtree(scratch, ignore_errors=True)
    progress(f"kafka: {len(jars)} jars cached in {target}")
    return target


def kafka_data_dir(settings: Settings) -> Path:
    return settings.kafka_dir / "data"


def server_properties(settings: Settings) -> str:
    """The broker's server.properties: one combined broker+controller KRaft node on `settings.host`."""
    host = settings.host
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        # Bootstrap servers, not static voters: the quorum is created by `format --standalone`.
        "controller.quorum.bootstrap.servers": f"{host}:{settings.kafka_controller_port}",
        "listeners": f"PLAINTEXT://{host}:{settings.kafka_port},CONTROLLER://{host}:{settings.kafka_controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{settings.kafka_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(kafka_data_dir(settings)),
        "num.partitions": str(settings.partitions),
        "default.replication.factor": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # Topics come from infra/topics.py (created by the launcher), never from a typo in a client.
        "auto.create.topics.enable": "false",
        # A laptop-sized broker: two cores.
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
    }
    lines = ["# Generated by infra/stack.py; rewritten on every start.", *(f"{k}={v}" for k, v in props.items())]
    return "\n".join(lines) + "\n"


def log4j2_properties(settings: Settings) -> str:
    """Log4j 2 configuration (properties format) sending the broker's INFO log to kafka-server.log."""
    log_file = settings.log_dir / "kafka-server.log"
    return (
        "# Generated by infra/stack.py; rewritten on every start.\n"
        "status = warn\n"
        # Let Kafka's own shutdown hook log to the end; log4j stops when the JVM exits.
        "shutdownHook = disable\n"
        "name = loopcast-kafka\n"
        "appender.server.type = RollingFile\n"
        "appender.server.name = SERVER\n"
        f"appender.server.fileName = {log_file}\n"
        f"appender.server.filePattern = {log_file}.%i\n"
        "appender.server.layout.type = PatternLayout\n"
        "appender.server.layout.pattern = [%d] %p %m (%c)%n\n"
        "appender.server.policies.type = Policies\n"
        "appender.server.policies.size.type = SizeBasedTriggeringPolicy\n"
        "appender.server.policies.size.size = 50MB\n"
        "appender.server.strategy.type = DefaultRolloverStrategy\n"
        "appender.server.strategy.max = 3\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.server.ref = SERVER\n"
        "logger.request.name = kafka.request.logger\n"
        "logger.request.level = WARN\n"
    )


def parse_properties(text: str) -> dict[str, str]:
    """Enough of java.util.Properties for the files generated here: key=value lines, # comments."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def kafka_cluster_id() -> str:
    """A cluster id as `kafka-storage random-uuid` makes one: 16 random bytes, URL-safe base64."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # Kafka refuses ids that look like a command-line option
            return cid


def _java_classpath(jar_dir: Path) -> str:
    return f"{jar_dir}/*"


def kafka_broker_ready(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """True if the broker at host:port answers a Metadata request listing at least one live broker.

    A bare TCP connect is not enough: the listener accepts before the broker has joined the
    metadata quorum and been unfenced, and only then can topics be created.
    """
    client_id = b"loopcast-health"
    # Request header v1 + MetadataRequest v4 body: topics = [] (none), allow_auto_topic_creation = false.
    body = struct.pack(">hhih", 3, 4, 1, len(client_id)) + client_id + struct.pack(">ib", 0, 0)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(body)) + body)
            size = struct.unpack(">i", _recv_exact(sock, 4))[0]
            payload = _recv_exact(sock, size)
    except (OSError, struct.error):
        return False
    # Response header v0 (correlation id), then throttle_time_ms and the brokers array's length.
    if len(payload) < 12:
        return False
    correlation_id, _throttle, brokers = struct.unpack(">iii", payload[:12])
    return correlation_id == 1 and brokers >= 1


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return bytes(buf)


def _split_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for item in bootstrap.split(","):
        item = item.strip()
        if "://" in item:
            item = item.split("://", 1)[1]
        host, _, port = item.rpartition(":")
        out.append((host.strip("[]") or "127.0.0.1", int(port or 9092)))
    return out


def kafka_healthy(bootstrap: str, timeout_s: float = 2.0) -> bool:
    return any(kafka_broker_ready(h, p, timeout_s) for h, p in _split_bootstrap(bootstrap))


def redis_healthy(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "not healthy"
        return False


def _port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# Topics


def _run_coro(factory: Callable[[], Any]) -> Any:
    """Run a coroutine to completion from sync code, even when called inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


TOPIC_ALREADY_EXISTS = 36


async def ensure_topics_async(
    settings: Settings,
    specs: Sequence[topic_specs.TopicSpec] = topic_specs.ALL,
    timeout_s: float = 60.0,
    progress: Progress | None = None,
) -> list[str]:
    """Create every topic in `specs` that the cluster lacks; return the names created.

    Existing topics are left as they are (their partitions and configs are not altered). The
    replication factor is min(3, number of brokers), i.e. 1 on the local stack.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError

    progress = progress or _noop
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=15000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [s for s in specs if s.name not in existing]
            if not missing:
                return []
            brokers = len((await admin.describe_cluster()).get("brokers", [])) or 1
            replication = min(3, brokers)
            resp = await admin.create_topics(
                [
                    NewTopic(
                        s.name,
                        s.partitions or settings.partitions,
                        replication,
                        topic_configs=dict(s.config),
                    )
                    for s in missing
                ],
                timeout_ms=15000,
            )
            failed = [
                f"{err[0]}: error {err[1]} {err[2] if len(err) > 2 else ''}".strip()
                for err in resp.topic_errors
                if err[1] not in (0, TOPIC_ALREADY_EXISTS)
            ]
            if failed:
                raise StackError("creating topics failed: " + "; ".join(failed))
            names = {s.name for s in missing}
            await wait_for_async(
                lambda admin=admin, names=names: _all_listed(admin, names),
                timeout_s=max(1.0, deadline - time.monotonic()),
                interval_s=0.2,
                what="new topics to appear in metadata",
            )
            created = [s.name for s in missing]
            progress(f"topics: created {', '.join(created)}")
            return created
        except (KafkaError, OSError, TimeoutError) as exc:
            last_error = exc
            await asyncio.sleep(0.5)
        finally:
            await admin.close()
    raise StackError(f"could not create topics on {settings.bootstrap} within {timeout_s:g}s: {last_error!r}")


async def _all_listed(admin: Any, names: set[str]) -> bool:
    return names <= set(await admin.list_topics())


def ensure_topics(
    settings: Settings,
    specs: Sequence[topic_specs.TopicSpec] = topic_specs.ALL,
    timeout_s: float = 60.0,
    progress: Progress | None = None,
) -> list[str]:
    return _run_coro(lambda: ensure_topics_async(settings, specs, timeout_s, progress))


def settings_env(settings: Settings) -> dict[str, str | None]:
    """`settings` as LOOPCAST_* environment variables (None: the variable must be absent).

    Every process the stack starts gets these, so a worker started by a test stack on other ports
    or another home sees the very settings the stack was given, not the defaults.
    """
    prefix = settings.model_config.get("env_prefix", "LOOPCAST_")
    out: dict[str, str | None] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        key = f"{prefix}{name}".upper()
        if value is None:
            out[key] = None
        elif isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, (str, int, float, Path)):
            out[key] = str(value)
        else:
            out[key] = json.dumps(value, default=str)
    return out


def _child_env(settings: Settings, extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in settings_env(settings).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------------------------------
# The stack


@dataclass
class _Service:
    name: str
    argv: Callable[[], list[str]]
    health: Callable[[], bool]
    env: dict[str, str] | None = None
    timeout_s: float = 60.0
    stop_timeout_s: float = 15.0
    address: str = ""
    cwd: Path | None = None
    log_path: Path | None = None
    extra_logs: tuple[Path, ...] = ()
    prepare: Callable[[], None] | None = None
    ports: tuple[tuple[str, int], ...] = ()
    external: bool = False


class Stack:
    """Start, inspect and stop the local stack. Safe to use from several processes (a lock file)."""

    def __init__(self, settings: Settings, progress: Callable[[str], None] | None = None):
        self.settings = settings
        self.progress = progress or _noop
        self._registered: dict[str, _Service] = {}
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # ---- registration -------------------------------------------------------------------------

    def register(
        self,
        name: str,
        argv: list[str],
        health: Callable[[], bool],
        env: dict[str, str] | None = None,
        timeout_s: float = 60,
        address: str = "",
        stop_timeout_s: float = 15.0,
    ) -> None:
        """Declare a managed process that `up(services=[..., name])` can start and `down()` stops."""
        if name in BUILTIN:
            raise ValueError(f"{name!r} is a built-in service")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad service name {name!r}")
        argv = list(argv)
        self._registered[name] = _Service(
            name=name,
            argv=lambda: argv,
            health=health,
            env=dict(env) if env else None,
            timeout_s=timeout_s,
            stop_timeout_s=stop_timeout_s,
            address=address,
        )

    # ---- paths ----------------------------------------------------------------------------------

    def pid_path(self, name: str) -> Path:
        return self.settings.run_dir / f"{name}.pid"

    def log_path(self, name: str) -> Path:
        return self.settings.log_dir / f"{name}.log"

    # ---- built-in services ----------------------------------------------------------------------

    def _service(self, name: str) -> _Service:
        s = self.settings
        if name == KAFKA:
            jar_dir = kafka_jar_dir(s)
            return _Service(
                name=KAFKA,
                argv=lambda: [
                    shutil.which("java") or "java",
                    f"-Xmx{s.kafka_heap}",
                    f"-Xms{s.kafka_heap}",
                    "-XX:+ExitOnOutOfMemoryError",
                    "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={s.kafka_dir / 'log4j2.properties'}",
                    "-cp",
                    _java_classpath(jar_dir),
                    "kafka.Kafka",
                    str(s.kafka_dir / "server.properties"),
                ],
                health=lambda: kafka_healthy(s.bootstrap),
                timeout_s=90.0,
                stop_timeout_s=30.0,
                address=s.bootstrap,
                cwd=s.kafka_dir,
                log_path=s.log_dir / "kafka.out",
                extra_logs=(s.log_dir / "kafka-server.log",),
                prepare=self._prepare_kafka,
                ports=((s.host, s.kafka_port), (s.host, s.kafka_controller_port)),
                external=s.kafka_bootstrap is not None,
            )
        if name == REDIS:
            return _Service(
                name=REDIS,
                argv=lambda: [
                    shutil.which("redis-server") or "redis-server",
                    "--port",
                    str(s.redis_port),
                    "--bind",
                    s.host,
                    "--dir",
                    str(s.home / "redis"),
                    "--save",
                    "",
                    "--appendonly",
                    "yes" if s.redis_aof else "no",
                    "--auto-aof-rewrite-min-size",
                    f"{s.redis_aof_rewrite_min_mb}mb",
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "no",
                    "--logfile",
                    "",
                ],
                health=lambda: redis_healthy(s.redis),
                timeout_s=30.0,
                stop_timeout_s=10.0,
                address=s.redis,
                prepare=self._prepare_redis,
                ports=((s.host, s.redis_port),),
                external=s.redis_url is not None,
            )
        try:
            return self._registered[name]
        except KeyError:
            known = ", ".join([*BUILTIN, *self._registered])
            raise StackError(f"unknown service {name!r} (known: {known})") from None

    def _prepare_kafka(self) -> None:
        s = self.settings
        ensure_system_packages(["java"], self.progress)
        ensure_kafka_jars(s, self.progress)
        s.kafka_dir.mkdir(parents=True, exist_ok=True)
        (s.kafka_dir / "server.properties").write_text(server_properties(s))
        (s.kafka_dir / "log4j2.properties").write_text(log4j2_properties(s))
        self._format_kafka_storage()

    def _format_kafka_storage(self) -> None:
        """Format the log dir once (KRaft needs a cluster id and a bootstrap quorum before first start).

        Later starts reuse it, even with other ports: a single standalone voter re-elects itself.
        """
        s = self.settings
        data = kafka_data_dir(s)
        if (data / "meta.properties").exists():
            return
        cluster_id = kafka_cluster_id()
        self.progress(f"kafka: formatting storage (cluster id {cluster_id})")
        argv = [
            shutil.which("java") or "java",
            f"-Dlog4j2.configurationFile={s.kafka_dir / 'log4j2.properties'}",
            "-cp",
            _java_classpath(kafka_jar_dir(s)),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(s.kafka_dir / "server.properties"),
            "--standalone",
        ]
        proc = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=s.kafka_dir, timeout=120)
        if proc.returncode != 0 or not (data / "meta.properties").exists():
            out = "\n".join((proc.stdout + proc.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise StackError(f"formatting Kafka storage failed ({proc.returncode}): {shlex.join(argv)}\n{out}")

    def _prepare_redis(self) -> None:
        ensure_system_packages(["redis-server"], self.progress)
        (self.settings.home / "redis").mkdir(parents=True, exist_ok=True)

    # ---- locking --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.settings.run_dir / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- up -------------------------------------------------------------------------------------

    def up(self, services: Sequence[str] = (KAFKA, REDIS)) -> None:
        """Bring `services` up, in order; running healthy ones are left alone. Creates missing topics."""
        resolved = [self._service(name) for name in services]  # unknown names fail before anything starts
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            for svc in resolved:
                self._up_one(svc)
                if svc.name == KAFKA:
                    ensure_topics(self.settings, progress=self.progress)

    def _up_one(self, svc: _Service) -> None:
        started = time.monotonic()
        if svc.external:
            self.progress(f"{svc.name}: external at {svc.address}, waiting until healthy")
            self._wait_healthy(svc, None)
            return
        pid_path = self.pid_path(svc.name)
        record = read_pid_file(pid_path)
        if record is not None and record.is_alive():
            if _safe(svc.health):
                self.progress(f"{svc.name}: already running (pid {record.pid})")
                return
            self.progress(f"{svc.name}: running (pid {record.pid}) but not healthy yet, waiting")
            self._wait_healthy(svc, record)
            return
        if pid_path.exists():
            self.progress(f"{svc.name}: removing stale pid file")
            pid_path.unlink(missing_ok=True)
        for host, port in svc.ports:
            if _port_open(host, port):
                raise StackError(
                    f"{svc.name}: {host}:{port} is already in use by a process this stack did not start; "
                    "stop it or move the stack's ports (LOOPCAST_*_PORT)"
                )
        if svc.prepare is not None:
            svc.prepare()
        record = self._spawn(svc)
        self.progress(f"{svc.name}: started (pid {record.pid}), waiting until healthy")
        self._wait_healthy(svc, record)
        self.progress(f"{svc.name}: healthy after {time.monotonic() - started:.1f}s")

    def _spawn(self, svc: _Service) -> PidRecord:
        argv = svc.argv()
        log_path = svc.log_path or self.log_path(svc.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = _child_env(self.settings, svc.env)
        with open(log_path, "ab") as log:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"\n--- {stamp} loopcast stack starting {svc.name}: {shlex.join(argv)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    env=env,
                    cwd=svc.cwd,
                )
            except OSError as exc:
                raise StackError(f"{svc.name}: could not start {shlex.join(argv)}: {exc}") from exc
        self._procs[proc.pid] = proc
        record = PidRecord.of(proc.pid, argv)
        if record is None:  # gone and already reaped: impossible for an unreaped child, but be explicit
            raise StackError(f"{svc.name}: exited immediately\n{self._tail(svc)}")
        write_pid_file(self.pid_path(svc.name), record)
        return record

    def _tail(self, svc: _Service) -> str:
        return tail_lines([svc.log_path or self.log_path(svc.name), *svc.extra_logs])

    def _wait_healthy(self, svc: _Service, record: PidRecord | None) -> None:
        proc = self._procs.get(record.pid) if record is not None else None

        def check() -> bool:
            # Poll our own child first: it reaps the process and keeps its real exit code.
            code = proc.poll() if proc is not None else None
            if record is not None and (code is not None or not record.is_alive()):
                self.pid_path(svc.name).unlink(missing_ok=True)
                how = f"exited with code {code}" if code is not None else "exited"
                raise StackError(f"{svc.name} (pid {record.pid}) {how} before becoming healthy\n{self._tail(svc)}")
            return _safe(svc.health)

        try:
            wait_for(check, svc.timeout_s, interval_s=0.2, what=f"{svc.name} to become healthy")
        except TimeoutError as exc:
            if record is None:
                raise StackError(f"{svc.name} at {svc.address} is not healthy: {exc}") from None
            raise StackError(
                f"{svc.name} (pid {record.pid}) not healthy after {svc.timeout_s:g}s; it is still running "
                f"(`down()` stops it)\n{self._tail(svc)}"
            ) from None

    # ---- down -----------------------------------------------------------------------------------

    def _pid_files(self) -> dict[str, Path]:
        run_dir = self.settings.run_dir
        if not run_dir.is_dir():
            return {}
        return {p.stem: p for p in sorted(run_dir.glob("*.pid"))}

    def down(self) -> None:
        """Stop every process this stack started (per its pid files), apps before Kafka and Redis."""
        with self._lock():
            files = self._pid_files()
            registered = [n for n in reversed(self._registered) if n in files]
            others = [n for n in files if n not in BUILTIN and n not in registered]
            tiers = [registered + others, [n for n in (KAFKA, REDIS) if n in files]]
            for tier in tiers:
                if tier:
                    self._stop(tier)

    def stop(self, names: Sequence[str]) -> None:
        """Stop some of the processes this stack started (e.g. restart a worker with other settings)."""
        with self._lock():
            files = self._pid_files()
            running = [n for n in names if n in files]
            if running:
                self._stop(running)

    def _stop_timeout(self, name: str) -> float:
        if name in BUILTIN:
            return self._service(name).stop_timeout_s
        svc = self._registered.get(name)
        return svc.stop_timeout_s if svc else 15.0

    def _stop(self, names: list[str]) -> None:
        live: dict[str, PidRecord] = {}
        for name in names:
            path = self.pid_path(name)
            record = read_pid_file(path)
            if record is None or not record.is_alive():
                path.unlink(missing_ok=True)
                continue
            self.progress(f"{name}: stopping (pid {record.pid})")
            _signal_group(record, signal.SIGTERM)
            live[name] = record
        if not live:
            return

        def gone(subset: dict[str, PidRecord]) -> bool:
            for proc_pid in [r.pid for r in subset.values()]:
                proc = self._procs.get(proc_pid)
                if proc is not None:
                    proc.poll()
            return not any(r.is_alive() for r in subset.values())

        timeout = max(self._stop_timeout(n) for n in live)
        try:
            wait_for(lambda: gone(live), timeout, interval_s=0.1, what="processes to exit")
        except TimeoutError:
            stubborn = {n: r for n, r in live.items() if r.is_alive()}
            for name, record in stubborn.items():
                self.progress(f"{name}: did not exit within {timeout:g}s, sending SIGKILL")
                _signal_group(record, signal.SIGKILL)
            try:
                wait_for(lambda: gone(stubborn), 10.0, interval_s=0.1, what="killed processes to exit")
            except TimeoutError:
                raise StackError(f"could not stop {', '.join(stubborn)}") from None
        for name, record in live.items():
            self._procs.pop(record.pid, None)
            self.pid_path(name).unlink(missing_ok=True)
            self.progress(f"{name}: stopped")

    # ---- status ---------------------------------------------------------------------------------

    def status(self) -> list[ServiceStatus]:
        names = [*BUILTIN, *self._registered]
        names += [n for n in self._pid_files() if n not in names]
        out = []
        for name in names:
            svc = self._registered.get(name) or (self._service(name) if name in BUILTIN else None)
            if svc is not None and svc.external:
                healthy = _safe(svc.health)
                out.append(ServiceStatus(name, None, healthy, healthy, svc.address, external=True))
                continue
            record = read_pid_file(self.pid_path(name))
            running = record is not None and record.is_alive()
            pid = record.pid if running and record is not None else None
            if svc is None:  # a pid file from a process registered elsewhere: no health check known
                out.append(ServiceStatus(name, pid, running, running, ""))
                continue
            healthy = running and _safe(svc.health)
            out.append(ServiceStatus(name, pid, running, healthy, svc.address))
        return out


def _safe(health: Callable[[], bool]) -> bool:
    try:
        return bool(health())
    except Exception:  # noqa: BLE001 - a health check that raises is simply not healthy
        return False


def _signal_group(record: PidRecord, sig: int) -> None:
    """Signal the process group led by `record` (it was started in its own session), else the pid."""
    if not record.is_alive():
        return
    try:
        if os.getpgid(record.pid) == record.pid:
            os.killpg(record.pid, sig)
        else:
            os.kill(record.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
