"""The producer client: typed ``log_*`` helpers that validate at the call site and never block
the caller longer than ``max_block_ms``.

    producer = FeedbackProducer("localhost:9092")
    producer.log_impression(session_id="s1", user_id="u1", request_id="r1", response_id="a",
                            prompt="How do I ...?", response_text="...", position=0,
                            model_version="m-2026-11")
    producer.log_copy(session_id="s1", user_id="u1", request_id="r1", response_id="a")
    producer.close()
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from prefstream.errors import ProducerError
from schemas.events import (
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

log = logging.getLogger(__name__)
DEFAULT_TOPIC = "prefstream-events"


class FeedbackProducer:
    def __init__(self, bootstrap: str, *, topic: str = DEFAULT_TOPIC, max_block_ms: int = 1000,
                 **kafka_config: Any) -> None:
        self.topic = topic
        self._lock = threading.Lock()
        self.sent = 0
        self.failed = 0
        self.errors: list[str] = []
        # A fixed api_version skips the blocking version probe in the constructor, so an
        # unreachable broker surfaces as a bounded error on send (KIP-35 brokers, Kafka >= 2.8).
        config = {"api_version": (2, 8), "acks": "all", "linger_ms": 5, **kafka_config}
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=bootstrap, max_block_ms=max_block_ms, **config
            )
        except KafkaError as exc:
            raise ProducerError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc

    def send_raw(self, key: bytes | None, value: bytes) -> None:
        """Queue one message; raises :class:`ProducerError` if the buffer stays full too long."""
        try:
            future = self._producer.send(self.topic, key=key, value=value)
        except KafkaError as exc:
            self._record_failure(exc)
            raise ProducerError(f"event not queued within max_block_ms: {exc}") from exc
        future.add_callback(self._on_sent).add_errback(self._record_failure)

    def _on_sent(self, _metadata: Any) -> None:
        with self._lock:
            self.sent += 1

    def _record_failure(self, exc: BaseException) -> None:
        with self._lock:
            self.failed += 1
            if len(self.errors) < 100:
                self.errors.append(repr(exc))
        log.warning("event not delivered: %r", exc)

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
            raise ProducerError(f"flush did not finish in {timeout_s}s: {exc}") from exc

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.close(timeout=timeout_s)
