"""The worker's settings: validated once in ``main()`` and passed down.

Every field reads ``PREFSTREAM_<FIELD>`` from the environment; pair-rule thresholds are nested
(``PREFSTREAM_RULES__MIN_CONFIDENCE=0.6``). CLI flags override the environment.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.pairing import RuleConfig
from streams.sessionize import SessionRules


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PREFSTREAM_", env_nested_delimiter="__", extra="ignore"
    )

    kafka_bootstrap: str | None = Field(
        None, description="Kafka bootstrap servers; unset = start the embedded Tansu broker."
    )
    data_dir: Path = Field(Path("prefstream-data"), description="Parquet files + DuckDB catalog.")
    app_id: str = Field("prefstream", description="Faust app id = Kafka consumer group.")
    events_topic: str = "prefstream-events"
    dead_letter_topic: str = "prefstream-dead-letters"
    late_topic: str = "prefstream-late-events"
    partitions: int = Field(4, ge=1, le=256, description="Partitions of the events topic.")
    gap_s: float = Field(1800.0, gt=0, description="Inactivity gap (event time) closing a session.")
    grace_s: float = Field(300.0, ge=0,
                           description="Out-of-order tolerance; older events are late.")
    idle_s: float = Field(30.0, gt=0, description="Wall time without events before the watermark "
                          "follows the wall clock.")
    tick_interval_s: float = Field(5.0, gt=0, description="How often the worker ticks partitions.")
    max_events_per_session: int = Field(500, ge=2)
    max_session_duration_s: float = Field(6 * 3600.0, gt=0)
    max_future_s: float = Field(300.0, ge=0, description="Tolerated clock skew into the future.")
    max_message_bytes: int = Field(256 * 1024, ge=1024, description="Larger messages dead-letter.")
    flush_interval_s: float = Field(2.0, gt=0, description="Longest a closed session waits for "
                                    "its rows to be written.")
    flush_max_events: int = Field(5000, ge=1, description="Flush after this many events.")
    rebalance_timeout_s: float = Field(60.0, gt=0, description="Faust broker_rebalance_timeout.")
    metrics_host: str = Field("127.0.0.1", description="Address of the metrics endpoint "
                              "(0.0.0.0 to let other hosts scrape).")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Port of GET /metrics "
                              "(Prometheus text); 0 disables it.")
    rules: RuleConfig = Field(default_factory=RuleConfig)

    @model_validator(mode="after")
    def _hours_divide_day(self) -> Settings:
        if 24 % self.rules.partition_hours:
            raise ValueError("rules.partition_hours must divide 24")
        return self

    def as_env(self) -> dict[str, str]:
        """These settings as ``PREFSTREAM_*`` variables, for starting a worker process."""
        return {f"PREFSTREAM_{name.upper()}": str(value)
                for name, value in self.model_dump(exclude={"rules"}).items()
                if value is not None}

    def session_rules(self) -> SessionRules:
        return SessionRules(
            gap=timedelta(seconds=self.gap_s),
            grace=timedelta(seconds=self.grace_s),
            idle=timedelta(seconds=self.idle_s),
            max_events=self.max_events_per_session,
            max_duration=timedelta(seconds=self.max_session_duration_s),
        )
