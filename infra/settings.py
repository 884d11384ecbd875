"""Settings for every Loopcast process: one pydantic-settings class, env prefix LOOPCAST_.

Ports default to a block of their own so a local stack never collides with system services;
tests move the whole block by setting the port variables.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


@dataclass(frozen=True)
class MonitorSettings:
    """The delivery-rate monitor's numbers (streams.monitor), from the Settings fields `monitor_*`."""

    bucket_s: float
    window_s: float
    baseline_s: float
    min_samples: int
    min_baseline_samples: int
    margin: float
    z: float
    critical_drop: float
    recover_margin: float
    recover_s: float


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOPCAST_", env_nested_delimiter="__", extra="ignore")

    # Where the local stack keeps state, logs and pid files.
    home: Path = Field(default_factory=lambda: Path.home() / ".cache" / "loopcast")
    # Downloaded Kafka jars are shared by every home on the machine (they never change per version).
    jar_cache: Path = Field(default_factory=lambda: Path.home() / ".cache" / "loopcast-jars")

    host: str = "127.0.0.1"
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    kafka_version: str = "4.3.1"
    kafka_heap: str = "768m"
    redis_port: int = 16379
    # Append-only file on for a stack people use (the demo); tests turn it off for speed.
    redis_aof: bool = True
    # Redis compacts its append-only file once it has grown past this (and doubled): the compaction
    # forks a child that took a whole core for 5-6 s at 1.7 M keys, and at Redis's 64 MB default
    # it came every few hundred thousand messages, in the middle of a stream (a 168 ms stall here).
    redis_aof_rewrite_min_mb: int = 1024
    # The worker's HTTP port: click redirects, receipts, ingest, and read-only SQL over its chDB.
    http_port: int = 18800
    sandbox_port: int = 18900

    # External services: when set, the local stack does not start its own.
    kafka_bootstrap: str | None = None
    redis_url: str | None = None
    clickhouse_url: str | None = None

    app_id: str = "loopcast"
    # The stages this worker runs (comma-separated families or names); empty: all of them.
    stages: str = ""
    # Worker processes (`loopcast worker`, the local stack's worker): 0 means the warehouse owner plus
    # one sending process per core (infra.workers.default_processes).
    worker_processes: int = 0

    @property
    def processes(self) -> int:
        from infra.workers import default_processes

        return self.worker_processes or default_processes()

    # Sending processes take turns at the send path's halves instead of all sharing every stage: lower
    # latency for steady traffic, slower bursts (infra.workers.layout).
    send_path_halves: bool = False
    # How much lower the warehouse owner's CPU priority is than the sending processes' (nice; 0: the same).
    owner_nice: int = Field(default=10, ge=0, le=19)
    partitions: int = 4
    # The most records a stage takes at once (dispatch and feedback four times as many). A batch closes
    # when nothing more is queued, so this only matters under load, where each batch's round trips
    # (Redis, Kafka commits and acks) are shared by more messages: burst 4.0k msg/s at 500, 5.6k at 2,000.
    batch_size: int = 2000
    # How long a warehouse write waits to gather more rows: ClickHouse wants few, big inserts.
    warehouse_linger_s: float = 1.0
    # How often a stage commits the offsets it has handled (0: after every batch). Each commit is a round
    # trip and a write to the broker's offsets log: at a steady 1k/s, with small batches, committing every
    # batch was 7% of a sending process's CPU (now 1%). A crash redelivers at most this much, and every
    # stage's effects are idempotent.
    commit_interval_s: float = Field(default=0.2, ge=0)

    daily_cap: int = 5
    # Provider sends in flight per worker, granted to urgent messages first (streams.priority).
    dispatch_slots: int = 128
    # Off only to measure what priority routing buys (`loopcast bench policy`).
    priority_routing: bool = True
    # Global quiet hours in each user's local time ("22:00-08:00", or "off"); campaigns may replace them.
    quiet_hours: str = "22:00-08:00"
    # The time zone of users whose preferences name none.
    default_timezone: str = "UTC"
    # How often the A/B loop re-reads variant stats and decides.
    ab_interval_s: float = 5.0
    webhook_secret: SecretStr = SecretStr("loopcast-dev-webhook-secret")
    link_secret: SecretStr = SecretStr("loopcast-dev-link-secret")
    # Channel providers' credentials by scheme ("-" written "_"), e.g.
    # LOOPCAST_PROVIDERS__TWILIO__AUTH_TOKEN; each provider's Credentials model validates its own.
    providers: dict[str, dict[str, str]] = Field(default_factory=dict)
    # The delivery-rate monitor (streams.monitor): counters per bucket of monitor_bucket_s; the rate over
    # the last monitor_window_s against the baseline over the monitor_baseline_s before it.
    monitor_bucket_s: float = Field(default=5.0, gt=0)
    monitor_window_s: float = Field(default=30.0, gt=0)
    monitor_baseline_s: float = Field(default=600.0, gt=0)
    # Fewer outcomes than this in the window (or the baseline) say nothing either way.
    monitor_min_samples: int = Field(default=30, ge=1)
    monitor_min_baseline_samples: int = Field(default=100, ge=1)
    # A drop: current < baseline - max(margin, z standard errors); one deeper than critical_drop is critical.
    monitor_margin: float = Field(default=0.10, ge=0, le=1)
    monitor_z: float = Field(default=3.0, ge=0)
    monitor_critical_drop: float = Field(default=0.30, ge=0, le=1)
    # Recovered: the rate over the last recover_s is within recover_margin of the baseline it fell from.
    monitor_recover_margin: float = Field(default=0.05, ge=0, le=1)
    monitor_recover_s: float = Field(default=60.0, gt=0)
    # The configured channel operators hear alerts on (a WeCom bot, Slack, a webhook); "" for none.
    alert_channel: str = "ops-alerts"
    # Copy generation: any OpenAI-compatible endpoint (…/v1); unset, an offline phrase-table writer is used.
    llm_base_url: str | None = None
    llm_api_key: SecretStr = SecretStr("loopcast-dev-llm-key")
    llm_model: str = "gpt-4o-mini"
    llm_timeout_s: float = Field(default=60.0, gt=0)
    # Tries per candidate, counting each retry that tells the model why its copy was rejected.
    llm_attempts: int = Field(default=4, ge=1)
    # The SDK's own retries of 429 (after Retry-After) and 5xx answers, per request.
    llm_http_retries: int = Field(default=3, ge=0)
    # json_schema: response_format with a JSON schema; tools: function calling, for endpoints without it.
    llm_output_mode: Literal["json_schema", "tools"] = "json_schema"

    @cached_property
    def monitor(self) -> MonitorSettings:
        fields = MonitorSettings.__dataclass_fields__
        return MonitorSettings(**{name: getattr(self, f"monitor_{name}") for name in fields})

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or f"{self.host}:{self.kafka_port}"

    @property
    def redis(self) -> str:
        return self.redis_url or f"redis://{self.host}:{self.redis_port}/0"

    @property
    def http_base(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def sandbox_base(self) -> str:
        return f"http://{self.host}:{self.sandbox_port}"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def chdb_path(self) -> Path:
        return self.home / "chdb"

    @cached_property
    def kafka_dir(self) -> Path:
        return self.home / "kafka"


def get_settings() -> Settings:
    return Settings()
