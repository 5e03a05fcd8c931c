"""Notice that the events topic was re-created, so the worker reads the new log from its start.

A broker that lost its data (restarted without storage, like the embedded Tansu, or a topic
deleted and created again) starts every partition at offset 0 again, while the worker's
positions and the offsets it commits still point into the old log. Kafka answers a fetch past a
log's end with OFFSET_OUT_OF_RANGE, but not every broker does (Tansu returns nothing), and a
batch begun before the outage would commit its old offsets to the new log: either way the
worker would skip the new log's first messages. A topic's id (KIP-516) changes whenever the
topic is created again, so the worker compares it after every rebalance (which such a broker
always brings: the consumer group is gone with its data) and commits the start of the new log
before Faust seeks to the committed offsets.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

log = logging.getLogger(__name__)


class LogWatch:
    """Which partitions must be read again from the start (pure: ids in, partitions out).

    A re-created topic marks every partition; a marked partition is due once this worker owns
    it and stays marked until :meth:`done` (a partition another worker owns now may come to
    this one in a later rebalance).
    """

    def __init__(self, n_partitions: int) -> None:
        self.n_partitions = n_partitions
        self.topic_id: str | None = None
        self.pending: set[int] = set()

    def observe(self, topic_id: str | None, assigned: set[int]) -> set[int]:
        """Partitions to read from the start now; ``topic_id`` None means unknown (no broker)."""
        if topic_id is None:
            return set()
        if self.topic_id is not None and topic_id != self.topic_id:
            log.error("topic re-created (id %s -> %s): the broker lost its log; reading every "
                      "partition again from its start", self.topic_id, topic_id)
            self.pending = set(range(self.n_partitions))
        self.topic_id = topic_id
        return self.pending & assigned

    def done(self, partitions: set[int]) -> None:
        self.pending -= partitions


class TopicIds:
    """A topic's id from the broker's metadata, or None while the broker or topic is missing.

    A new admin client per call: calls are rare (once per rebalance), and a client kept from
    before a broker restart would fail the first call after it, the one that matters.
    """

    def __init__(self, bootstrap: str, **client_config: Any) -> None:
        self.bootstrap = bootstrap
        # short waits: kafka-python's default is 30 s per step
        self.client_config = {"bootstrap_timeout_ms": 5000, "request_timeout_ms": 5000,
                              **client_config}

    def topic_id(self, topic: str, *, tries: int = 3) -> str | None:
        """Blocking (run it in a thread); ``tries`` one second apart while there is no answer."""
        for attempt in range(tries):
            if attempt:
                time.sleep(1.0)
            found = self._topic_id(topic)
            if found is not None:
                return found
        return None

    def _topic_id(self, topic: str) -> str | None:
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, **self.client_config)
        except KafkaError as exc:
            log.warning("no metadata for %s: %r", topic, exc)
            return None
        try:
            described = admin.describe_topics([topic])
        except KafkaError as exc:
            log.warning("no metadata for %s: %r", topic, exc)
            return None
        finally:
            admin.close()
        found = [t for t in described if t.get("name") == topic and t.get("error_code") == 0]
        return str(found[0]["topic_id"]) if found else None
