"""The producer client on a real broker: typed helpers, call-site validation, bounded blocking."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from kafka import KafkaConsumer, TopicPartition
from pydantic import ValidationError

from prefstream.errors import ProducerError
from schemas.events import EVENT_ADAPTER
from streams.broker import EmbeddedBroker, free_port
from streams.producer import FeedbackProducer

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


def test_helpers_send_valid_json_keyed_by_session(broker: EmbeddedBroker) -> None:
    producer = FeedbackProducer(broker.bootstrap, topic="producer-test")
    common = {"session_id": "s-42", "user_id": "u", "request_id": "r"}
    producer.log_impression(**common, response_id="a", prompt="p", response_text="t", position=0,
                            model_version="m")
    producer.log_click(**common, response_id="a", dwell_ms=9000)
    producer.log_copy(**common, response_id="a")
    producer.log_thumbs(up=False, **common, response_id="a")
    producer.log_regenerate(**common, response_id="a")
    producer.log_edit(**common, response_id="a", edited_text="better")
    producer.log_reformulate(**common, prompt="p2", previous_request_id="r0")
    producer.log_session_end(**common)
    producer.flush()
    producer.close()
    assert (producer.sent, producer.failed) == (8, 0)

    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, consumer_timeout_ms=3000)
    tps = [TopicPartition("producer-test", p)
           for p in consumer.partitions_for_topic("producer-test")]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    records = list(consumer)
    consumer.close()
    types = [EVENT_ADAPTER.validate_json(r.value).type for r in records]
    assert types == ["impression", "click", "copy", "thumbs_down", "regenerate", "edit",
                     "reformulate", "session_end"]
    assert {r.key for r in records} == {b"s-42"}


def test_invalid_fields_raise_at_the_call_site(broker: EmbeddedBroker) -> None:
    producer = FeedbackProducer(broker.bootstrap, topic="producer-test-bad")
    with pytest.raises(ValidationError):
        producer.log_impression(session_id="s", user_id="u", request_id="r", response_id="a",
                                prompt="p", response_text="t", position=-1, model_version="m")
    with pytest.raises(ValidationError):
        producer.log_click(session_id="s", user_id="u", request_id="r", response_id="a")
    producer.close()
    assert producer.sent == 0


def test_an_unreachable_broker_never_blocks_past_the_bound() -> None:
    dead = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ProducerError):
        producer = FeedbackProducer(dead, max_block_ms=300)
        producer.log_copy(session_id="s", user_id="u", request_id="r", response_id="a")
    assert time.monotonic() - started < 5
