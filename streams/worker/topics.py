"""Create the worker's topics up front, so producers never auto-create them with one partition."""

from __future__ import annotations

import logging
import time

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from prefstream.errors import BrokerError
from prefstream.settings import Settings

log = logging.getLogger(__name__)


def ensure_topics(settings: Settings, *, timeout_s: float = 30.0) -> None:
    wanted = {
        settings.events_topic: settings.partitions,
        settings.dead_letter_topic: 1,
        settings.late_topic: 1,
    }
    deadline = time.monotonic() + timeout_s
    security = settings.kafka_client_config()
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **security)
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"Kafka at {settings.kafka_bootstrap}: {exc}") from exc
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(n, p, 1) for n, p in wanted.items() if n not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", [t.name for t in new])
    finally:
        admin.close()
