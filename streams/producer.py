"""The producer client: typed ``log_*`` helpers that validate at the call site and never block
the caller longer than ``max_block_ms``.

    producer = FeedbackProducer("localhost:9092")
    producer.log_impression(session_id="s1", user_id="u1", request_id="r1", response_id="a",
                            prompt="How do I ...?", response_text="...", position=0,
                            model_version="m-2026-11")
    producer.log_copy(session_id="s1", user_id="u1", request_id="r1", response_id="a")
    producer.close()

On a secured cluster pass ``security=KafkaSecurity(protocol="SASL_SSL", sasl_mechanism=
"SCRAM-SHA-512", sasl_username="svc", sasl_password=..., ssl_cafile="ca.pem")`` (or, in the
worker's processes, ``Settings().kafka_security()``); kafka-python's own keywords
(``security_protocol=...``) are accepted too, but not both at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections import deque
from datetime import datetime, timezone
from typing import Any, NamedTuple

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from prefstream.errors import ConfigError, ProducerError
from prefstream.schemas.events import (
    Click,
    Copy,
    Edit,
    Impression,
    Reformulate,
    Regenerate,
    SessionEnd,
    ThumbsDown,
    ThumbsUp,
)
from prefstream.settings import KAFKA_PYTHON_SECURITY_KEYS, KafkaSecurity

log = logging.getLogger(__name__)
DEFAULT_TOPIC = "prefstream-events"
#: events queued but not yet acknowledged (kafka-python 3 has no ``buffer_memory`` bound)
DEFAULT_MAX_PENDING = 50_000
#: undelivered events kept for :meth:`FeedbackProducer.take_undelivered` (all count in ``failed``)
MAX_UNDELIVERED = 10_000


class Undelivered(NamedTuple):
    """An event the broker never acknowledged: send it again, or keep it somewhere durable."""

    key: bytes | None
    value: bytes
    error: str


class FeedbackProducer:
    def __init__(self, bootstrap: str, *, topic: str = DEFAULT_TOPIC, max_block_ms: int = 1000,
                 security: KafkaSecurity | None = None, **kafka_config: Any) -> None:
        self.topic = topic
        self._lock = threading.Lock()
        self.sent = 0
        self.failed = 0
        self.errors: list[str] = []
        self.attempted = 0  # always sent + failed + pending
        self.pending = 0  # queued, not yet acknowledged or failed
        self.max_pending = DEFAULT_MAX_PENDING
        self._undelivered: deque[Undelivered] = deque(maxlen=MAX_UNDELIVERED)
        self._room = threading.Condition(self._lock)
        self._last_error: BaseException | None = None
        # A fixed api_version skips the blocking version probe in the constructor, so an
        # unreachable broker surfaces as a bounded error on send (KIP-35 brokers, Kafka >= 2.8).
        # Not idempotent: the worker ignores re-sent event_ids anyway, and a broker that lost
        # its producer state (a restarted Tansu) would fail an idempotent producer for good.
        config = {"api_version": (2, 8), "acks": "all", "linger_ms": 5, "enable_idempotence": False,
                  **_security_config(security, kafka_config), **kafka_config}
        self._hint = _security_hint(security, config)
        self.bootstrap = bootstrap
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=bootstrap, max_block_ms=max_block_ms, **config
            )
        except KafkaError as exc:
            raise ProducerError(f"cannot reach Kafka at {bootstrap}: {exc}{self._hint}") from exc

    def send_raw(self, key: bytes | None, value: bytes) -> None:
        """Queue one message; raises :class:`ProducerError` if it is not queued within
        ``max_block_ms`` (no metadata, or ``max_pending`` events still unacknowledged)."""
        self._reserve(key, value)
        try:
            future = self._producer.send(self.topic, key=key, value=value)
        except KafkaError as exc:
            self._record_failure(key, value, exc)
            if not any(answers(server) for server in self.bootstrap.split(",")):
                raise ProducerError(
                    f"no Kafka broker answers at {self.bootstrap}: nothing listens there (start "
                    "one, e.g. `prefstream worker`, which runs an embedded broker on "
                    "localhost:9092, or give the address a broker prints)") from None
            raise ProducerError(f"event not queued within max_block_ms: {exc}{self._hint}"
                                ) from exc
        except BaseException:  # bad arguments, not an event: undo the count
            with self._room:
                self.attempted -= 1
                self.pending -= 1
                self._room.notify()
            raise
        future.add_callback(self._on_sent).add_errback(self._record_failure, key, value)

    def _reserve(self, key: bytes | None, value: bytes) -> None:
        """Count the attempt and wait, at most ``max_block_ms``, until fewer than
        ``max_pending`` events are pending: during an outage the buffer stays bounded."""
        wait_s = self._producer.config["max_block_ms"] / 1000
        with self._room:
            self.attempted += 1
            if self._room.wait_for(lambda: self.pending < self.max_pending, wait_s):
                self.pending += 1
                return
            full = ProducerError(f"{self.pending} events pending (max_pending="
                                 f"{self.max_pending}): not queued within max_block_ms")
            first = self._count_failure(key, value, full, pending=False)
        if first:
            log.warning("event not delivered: %r", full)
        raise full

    def _on_sent(self, _metadata: Any) -> None:
        with self._room:
            self.sent += 1
            self.pending -= 1
            self._room.notify()

    def _record_failure(self, key: bytes | None, value: bytes, exc: BaseException) -> None:
        with self._room:
            first = self._count_failure(key, value, exc, pending=True)
        if first:  # one line per error: a failed batch reports the same error for each record
            log.warning("event not delivered: %r", exc)

    def _count_failure(self, key: bytes | None, value: bytes, exc: BaseException, *,
                       pending: bool) -> bool:
        """With the lock held; returns whether this error is new (worth a log line)."""
        self.failed += 1
        if pending:
            self.pending -= 1
            self._room.notify()
        if len(self.errors) < 100:
            self.errors.append(repr(exc))
        self._undelivered.append(Undelivered(key, value, repr(exc)))
        first, self._last_error = exc is not self._last_error, exc
        return first

    def take_undelivered(self) -> list[Undelivered]:
        """The events not delivered since the last call (at most the last ``MAX_UNDELIVERED``;
        ``failed`` counts them all), to send again or to keep: ``for e in
        producer.take_undelivered(): producer.send_raw(e.key, e.value)``."""
        with self._room:
            taken = list(self._undelivered)
            self._undelivered.clear()
        return taken

    def _send(self, event: Any) -> str:
        self.send_raw(event.session_id.encode(), event.model_dump_json().encode())
        return str(event.event_id)

    @staticmethod
    def _common(fields: dict[str, Any]) -> dict[str, Any]:
        fields.setdefault("event_id", uuid.uuid4().hex)
        if fields.get("ts") is None:
            fields["ts"] = datetime.now(timezone.utc)
        return fields

    def log_impression(self, **fields: Any) -> str:
        return self._send(Impression(**self._common(fields)))

    def log_click(self, **fields: Any) -> str:
        return self._send(Click(**self._common(fields)))

    def log_copy(self, **fields: Any) -> str:
        return self._send(Copy(**self._common(fields)))

    def log_thumbs(self, *, up: bool, **fields: Any) -> str:
        model = ThumbsUp if up else ThumbsDown
        return self._send(model(**self._common(fields)))

    def log_regenerate(self, **fields: Any) -> str:
        return self._send(Regenerate(**self._common(fields)))

    def log_edit(self, **fields: Any) -> str:
        return self._send(Edit(**self._common(fields)))

    def log_reformulate(self, **fields: Any) -> str:
        return self._send(Reformulate(**self._common(fields)))

    def log_session_end(self, **fields: Any) -> str:
        return self._send(SessionEnd(**self._common(fields)))

    def flush(self, timeout_s: float | None = 30.0) -> None:
        """Wait for queued events; failures are counted in ``failed`` / ``errors``."""
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise ProducerError(f"flush did not finish in {timeout_s}s: {exc}{self._hint}"
                                ) from exc

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait up to ``timeout_s`` for queued events, then close. Events still queued then are
        not sent: they count in ``failed`` (``take_undelivered`` returns them).

        kafka-python's own close raises ``KafkaTimeoutError`` when its wait times out and
        leaves its sender thread running; a ``close`` in a ``finally`` (Ctrl-C while
        producing) would then replace the exception being handled. Here its sender is stopped
        without sending, which fails the queued events, and the close completes."""
        try:
            self._producer.close(timeout=timeout_s)
        except KafkaTimeoutError:
            sender = self._producer._sender  # kafka-python has no public forced close
            sender.force_close()
            sender.join(timeout_s)
            self._producer.close(timeout=0)  # nothing is queued any more: completes


def answers(server: str, timeout_s: float = 0.5) -> bool:
    """Whether anything accepts a TCP connection at ``host:port``."""
    host, _, port = server.strip().rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "localhost", int(port)),
                                      timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _security_config(security: KafkaSecurity | None, kafka_config: dict[str, Any]
                     ) -> dict[str, Any]:
    if security is None:
        return {}
    both = sorted(KAFKA_PYTHON_SECURITY_KEYS & kafka_config.keys())
    if both:
        raise ConfigError(f"security given twice: as security= and as {', '.join(both)}")
    return security.kafka_python_config()


def _security_hint(security: KafkaSecurity | None, config: dict[str, Any]) -> str:
    """What to check when a secured connection fails (the broker only times out); no secret."""
    protocol = config.get("security_protocol", "PLAINTEXT")
    if protocol == "PLAINTEXT":
        return ""
    what = security.describe() if security is not None else f"security_protocol={protocol}"
    return (f" [{what}: check that the broker's listener speaks this protocol, that it trusts "
            "the credentials and that the client trusts its certificate]")
