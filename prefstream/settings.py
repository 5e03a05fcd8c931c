"""The worker's settings: validated once in ``main()`` and passed down.

Every field reads ``PREFSTREAM_<FIELD>`` from the environment; pair-rule thresholds are nested
(``PREFSTREAM_RULES__MIN_CONFIDENCE=0.6``). CLI flags override the environment. Secrets (the
SASL password, the TLS key password, the pseudonym key) are ``SecretStr``: masked in ``repr``,
and validation errors never echo their inputs.
"""

from __future__ import annotations

import logging
import ssl
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefstream.errors import ConfigError
from prefstream.schemas.rules import RuleConfig, SessionRules

log = logging.getLogger(__name__)

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
TextStorage = Literal["full", "redact", "drop"]
#: kafka-python keywords that :meth:`KafkaSecurity.kafka_python_config` sets
KAFKA_PYTHON_SECURITY_KEYS = frozenset({
    "security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
    "ssl_context", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password",
    "ssl_check_hostname",
})


class KafkaSecurity(BaseModel):
    """How a Kafka client connects: protocol, SASL login, TLS files. One object configures
    kafka-python (:meth:`kafka_python_config`) and Faust (:meth:`faust_credentials`) alike."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: FilePath | None = None
    ssl_certfile: FilePath | None = None
    ssl_keyfile: FilePath | None = None
    ssl_key_password: SecretStr | None = None
    ssl_check_hostname: bool = True

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.protocol.endswith("SSL")

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecurity:
        if self.uses_sasl and not (self.sasl_username and self.sasl_password):
            raise ValueError(
                f"security protocol {self.protocol} needs a SASL username and password "
                "(PREFSTREAM_KAFKA_SASL_USERNAME, PREFSTREAM_KAFKA_SASL_PASSWORD)")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("a TLS client key needs its certificate "
                             "(PREFSTREAM_KAFKA_SSL_CERTFILE)")
        if self.ssl_key_password and not self.ssl_certfile:
            raise ValueError("a TLS key password needs a client certificate and key "
                             "(PREFSTREAM_KAFKA_SSL_CERTFILE, PREFSTREAM_KAFKA_SSL_KEYFILE)")
        return self

    def unused(self) -> list[str]:
        """Names of settings given that this protocol does not use (worth a warning)."""
        names = []
        if not self.uses_sasl:
            names += [n for n in ("sasl_username", "sasl_password") if getattr(self, n)]
        if not self.uses_tls:
            names += [n for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile",
                                  "ssl_key_password") if getattr(self, n)]
        return names

    def describe(self) -> str:
        """For error messages and logs: the protocol, mechanism and user, never a secret."""
        if not self.uses_sasl:
            return f"security_protocol={self.protocol}"
        return (f"security_protocol={self.protocol}, sasl_mechanism={self.sasl_mechanism}, "
                f"user {self.sasl_username!r}")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context both libraries use (None without TLS); :class:`ConfigError` when a
        file cannot be loaded (not PEM, wrong key password, key not matching the cert)."""
        if not self.uses_tls:
            return None
        cafile = str(self.ssl_cafile) if self.ssl_cafile else None
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"Kafka TLS: cannot load the CA file {cafile}: {exc}") from exc
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile:
            password = self.ssl_key_password.get_secret_value() if self.ssl_key_password else None
            try:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password=password)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"Kafka TLS: cannot load the client certificate {self.ssl_certfile} with "
                    f"key {self.ssl_keyfile or '(in the certificate file)'}: {exc}") from exc
        return context

    def kafka_python_config(self) -> dict[str, Any]:
        """Keyword arguments for every kafka-python client (producer, consumer, admin)."""
        return kafka_python_config(self, self.ssl_context())

    def faust_credentials(self) -> Any:
        """``broker_credentials`` for ``faust.App`` (None for PLAINTEXT)."""
        return faust_credentials(self, self.ssl_context())


def kafka_python_config(security: KafkaSecurity,
                        context: ssl.SSLContext | None) -> dict[str, Any]:
    """kafka-python's keywords for ``security`` with an already built TLS ``context``."""
    config: dict[str, Any] = {"security_protocol": security.protocol}
    if security.uses_tls:
        config["ssl_context"] = context
    if security.uses_sasl:
        assert security.sasl_password is not None  # checked by the validator
        config.update(sasl_mechanism=security.sasl_mechanism,
                      sasl_plain_username=security.sasl_username,
                      sasl_plain_password=security.sasl_password.get_secret_value())
    return config


def faust_credentials(security: KafkaSecurity, context: ssl.SSLContext | None) -> Any:
    """Faust's credentials object for ``security`` (protocol follows from its type)."""
    import faust

    if security.uses_sasl:
        assert security.sasl_password is not None
        return faust.SASLCredentials(
            username=security.sasl_username, password=security.sasl_password.get_secret_value(),
            mechanism=security.sasl_mechanism, ssl_context=context)
    if security.uses_tls:
        return faust.SSLCredentials(context)
    return None


def check_host_port(server: str) -> None:
    """``ValueError`` unless ``server`` is ``host:port`` with a port from 1 to 65535."""
    host, sep, port = server.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{server!r} is not host:port (e.g. localhost:9092)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{server!r}: port {port!r} is not a number from 1 to 65535")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PREFSTREAM_", env_nested_delimiter="__", extra="ignore",
        hide_input_in_errors=True,  # an error must never echo a password or key
    )

    kafka_bootstrap: str | None = Field(
        None, description="Kafka bootstrap servers; unset = start the embedded Tansu broker.")
    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="How every Kafka client connects: PLAINTEXT, SSL, "
        "SASL_PLAINTEXT or SASL_SSL (the embedded broker speaks PLAINTEXT only).")
    kafka_sasl_mechanism: SaslMechanism = Field(
        "PLAIN", description="SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.")
    kafka_sasl_username: str | None = Field(None, description="SASL user (SASL_* protocols).")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="SASL password; never logged or printed.")
    kafka_ssl_cafile: FilePath | None = Field(
        None, description="PEM file of the CA(s) that signed the brokers' certificates; unset = "
        "the system's trusted CAs.")
    kafka_ssl_certfile: FilePath | None = Field(
        None, description="PEM client certificate (TLS client authentication).")
    kafka_ssl_keyfile: FilePath | None = Field(
        None, description="PEM key of the client certificate; unset = inside the certificate file.")
    kafka_ssl_key_password: SecretStr | None = Field(
        None, description="Password of an encrypted client key; never logged or printed.")
    kafka_ssl_check_hostname: bool = Field(
        True, description="Check that the broker certificate names the host connected to.")
    pseudonym_key: SecretStr | None = Field(
        None, description="Key of the HMAC-SHA256 that replaces every user id before anything "
        "is stored; unset = user ids stored as sent. Never logged or printed.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines of every prefstream process: text, or json (one object "
        "a line: ts, level, logger, message, exc) for log shippers.")
    tick_key: SecretStr | None = Field(
        None, description="Key of the HMAC that signs the workers' watermark ticks (only signed "
        "ticks move a partition's clock); unset = a random key kept in <data-dir>/tick.key, "
        "shared by the workers of that data dir. Never logged or printed.")
    text_storage: TextStorage = Field(
        "full", description="Prompts and answers in stored rows, dead letters and late events: "
        "full, redact (hash and length) or drop. The trainer needs full.")
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
    max_open_sessions: int = Field(
        100_000, ge=1, description="Open sessions one Kafka partition holds at most; one more "
        "closes the open session with the oldest last event early (close reason evicted, "
        "counted in prefstream_sessions_evicted_total). Per Kafka partition, not per worker, so "
        "the output does not depend on how partitions are assigned to workers.")
    max_session_bytes: int = Field(
        900_000, ge=64 * 1024, le=950_000, description="State one session id may hold (its "
        "changelog record, under the producer's 1 MB request limit). A session closes early "
        "(close reason max_bytes, counted in prefstream_sessions_max_bytes_total) before its "
        "events pass half of it; an event that would still take the state over it is "
        "dead-lettered. A message counts as its JSON-escaped length plus 128 bytes, each group "
        "of the id (open, or closed and not yet written) 400 bytes plus its two ids.")
    max_session_duration_s: float = Field(6 * 3600.0, gt=0)
    dedupe_horizon_s: float = Field(
        3600.0, ge=0, description="How long (event time after its session's last event) an "
        "event id stays known once its session was stored: a new event re-using it within "
        "that is dead-lettered (prefstream_stored_duplicates_total). Kept in <data-dir>/dedupe.")
    max_future_s: float = Field(300.0, ge=0, description="Tolerated clock skew into the future.")
    max_message_bytes: int = Field(256 * 1024, ge=1024, description="Larger messages dead-letter.")
    flush_interval_s: float = Field(2.0, gt=0, description="Longest a closed session waits for "
                                    "its rows to be written.")
    flush_max_events: int = Field(20_000, ge=1, description="Flush after this many events "
                                  "(or after flush_interval_s, whichever comes first).")
    take_max_events: int = Field(5000, ge=1, description="The worker handles events in batches "
                                 "of at most this many.")
    take_within_s: float = Field(0.2, gt=0, description="Longest the worker waits to fill a "
                                 "batch before it handles what it has.")
    pipeline_process: bool = Field(False, description="Run the worker's pipeline (validate, "
                                   "sessionize, pair, write files) in a child process fed whole "
                                   "batches: about x1.3 to x1.6 the events/s of one worker when "
                                   "it has two cores to itself, for about 110 MB more; off, "
                                   "workers scale by process, one core each (docs/operations.md).")
    compaction_max_files: int = Field(32, ge=2, description="A partition written to that holds "
                                      "more files than this is merged into one after the flush "
                                      "(sealed partitions always are); merges wait while a "
                                      "reader holds the catalog open.")
    compaction_grace_s: float = Field(600.0, ge=0, description="How long the files a merge "
                                      "replaced are kept for readers that listed them; longer "
                                      "than any read.")
    rebalance_timeout_s: float = Field(60.0, gt=0, description="Faust broker_rebalance_timeout.")
    session_timeout_s: float = Field(45.0, gt=1, description="A worker that stops heartbeating "
                                     "(killed, hung) loses its partitions to the others after "
                                     "this long; heartbeats go every second. The embedded "
                                     "broker also holds a new worker's first join for about "
                                     "half of it (the demo uses 6 s).")
    metrics_host: str = Field("127.0.0.1", description="Address of the metrics endpoint "
                              "(0.0.0.0 to let other hosts scrape).")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Port of GET /metrics "
                              "(Prometheus text); 0 disables it.")
    rules: RuleConfig = Field(default_factory=RuleConfig)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _empty_data_dir_is_unset(cls, value: Any) -> Any:
        """``PREFSTREAM_DATA_DIR=`` (empty: an unset variable in a script or compose file) is the
        default, as for every other command (``prefstream.datadir.default_data_dir``): never
        the working directory, where a worker would write its files among the user's."""
        return cls.model_fields["data_dir"].default if value == "" else value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _host_ports(cls, value: str | None) -> str | None:
        if value is not None:
            for server in value.split(","):
                check_host_port(server.strip())
        return value

    @model_validator(mode="after")
    def _hours_divide_day(self) -> Settings:
        if 24 % self.rules.partition_hours:
            raise ValueError(f"rules.partition_hours must divide 24, got "
                             f"{self.rules.partition_hours} (PREFSTREAM_RULES__PARTITION_HOURS)")
        return self

    @model_validator(mode="after")
    def _security_consistent(self) -> Settings:
        try:
            security = self.kafka_security()
        except ValidationError as exc:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ")
                                       for e in exc.errors())) from None
        if security.protocol != "PLAINTEXT" and not self.kafka_bootstrap:
            raise ValueError(f"kafka_security_protocol={security.protocol} needs "
                             "PREFSTREAM_KAFKA_BOOTSTRAP: the embedded broker speaks PLAINTEXT "
                             "only")
        unused = security.unused()
        if unused:
            log.warning("kafka_security_protocol=%s does not use %s: ignored", security.protocol,
                        ", ".join(f"kafka_{n}" for n in unused))
        return self

    def kafka_security(self) -> KafkaSecurity:
        """The Kafka connection settings as one object for every client."""
        return KafkaSecurity(
            protocol=self.kafka_security_protocol, sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username, sasl_password=self.kafka_sasl_password,
            ssl_cafile=self.kafka_ssl_cafile, ssl_certfile=self.kafka_ssl_certfile,
            ssl_keyfile=self.kafka_ssl_keyfile, ssl_key_password=self.kafka_ssl_key_password,
            ssl_check_hostname=self.kafka_ssl_check_hostname)

    def kafka_client_config(self) -> dict[str, Any]:
        """Security keywords for a kafka-python client (:class:`ConfigError` on bad TLS files)."""
        return self.kafka_security().kafka_python_config()

    def as_env(self) -> dict[str, str]:
        """These settings as ``PREFSTREAM_*`` variables, for starting a worker process.

        Secrets are in clear here (the child needs them): pass the result to a child's
        environment, never print or log it.
        """
        env = {}
        for name, value in self.model_dump(exclude={"rules"}).items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is not None:
                env[f"PREFSTREAM_{name.upper()}"] = str(value)
        return env

    @property
    def partition_hours(self) -> int:
        """Hours per storage partition: the writer's setting (it stamps each row's partition,
        ``storage.partitions.stamp``), set as ``PREFSTREAM_RULES__PARTITION_HOURS`` as before."""
        return self.rules.partition_hours

    def session_rules(self) -> SessionRules:
        return SessionRules(
            gap=timedelta(seconds=self.gap_s),
            grace=timedelta(seconds=self.grace_s),
            idle=timedelta(seconds=self.idle_s),
            max_events=self.max_events_per_session,
            max_duration=timedelta(seconds=self.max_session_duration_s),
            max_bytes=self.max_session_bytes,
            tick_slack=timedelta(seconds=2 * self.tick_interval_s),
        )
