"""The producer client on a real broker: typed helpers, call-site validation, bounded blocking,
and connection security (TLS through a TLS listener in front of the broker, SASL settings)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from factories import read_all, read_records
from pydantic import ValidationError
from tls_broker import Pki, TlsBroker, make_pki

from prefstream.errors import ConfigError, ProducerError
from prefstream.schemas.events import EVENT_ADAPTER
from prefstream.settings import KafkaSecurity
from prefstream.streams.broker import EmbeddedBroker, free_port
from prefstream.streams.producer import FeedbackProducer

pytestmark = pytest.mark.broker


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

    records = read_records(broker.bootstrap, "producer-test")
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
    with pytest.raises(ProducerError, match=f"no Kafka broker answers at {dead}: nothing "
                       "listens there") as err:
        producer = FeedbackProducer(dead, max_block_ms=300)
        producer.log_copy(session_id="s", user_id="u", request_id="r", response_id="a")
    assert time.monotonic() - started < 5
    assert "\n" not in str(err.value)


# --- connection security ---------------------------------------------------------------------

KEY_PASSWORD = "producer-key-pw-8Hc"
SASL_PASSWORD = "producer-sasl-pw-3Nd"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), KEY_PASSWORD)


def test_events_reach_a_tls_listener_with_a_client_certificate(pki: Pki, tmp_path: Path) -> None:
    security = KafkaSecurity(protocol="SSL", ssl_cafile=pki.ca, ssl_certfile=pki.client_cert,
                             ssl_keyfile=pki.client_key, ssl_key_password=KEY_PASSWORD)
    with TlsBroker(pki, log_path=tmp_path / "broker.log") as broker:
        producer = FeedbackProducer(broker.bootstrap, topic="tls-test", security=security,
                                    max_block_ms=10_000)
        producer.log_copy(session_id="s-1", user_id="u", request_id="r", response_id="a")
        producer.flush()
        producer.close()
        values = read_all(broker.bootstrap, "tls-test", **security.kafka_python_config())
        assert broker.handshakes >= 2
    assert (producer.sent, producer.failed) == (1, 0)
    assert [EVENT_ADAPTER.validate_json(v).type for v in values] == ["copy"]


def test_an_untrusted_broker_certificate_fails_with_a_hint(pki: Pki, tmp_path: Path) -> None:
    stranger = KafkaSecurity(protocol="SSL", ssl_cafile=pki.other_ca)
    with TlsBroker(pki, log_path=tmp_path / "broker.log") as broker:
        producer = FeedbackProducer(broker.bootstrap, topic="tls-test", security=stranger,
                                    max_block_ms=1000)
        with pytest.raises(ProducerError, match=r"security_protocol=SSL: check that") as err:
            producer.log_copy(session_id="s", user_id="u", request_id="r", response_id="a")
        producer.close(timeout_s=1)
    assert "trusts" in str(err.value)


def test_a_sasl_client_on_a_plaintext_listener_fails_clearly_without_its_password(
        broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture) -> None:
    security = KafkaSecurity(protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                             sasl_username="svc", sasl_password=SASL_PASSWORD)
    caplog.set_level(logging.DEBUG)
    producer = FeedbackProducer(broker.bootstrap, topic="sasl-test", security=security,
                                max_block_ms=1000)
    with pytest.raises(ProducerError) as err:
        producer.log_copy(session_id="s", user_id="u", request_id="r", response_id="a")
    producer.close(timeout_s=1)
    message = str(err.value)
    assert "security_protocol=SASL_PLAINTEXT, sasl_mechanism=SCRAM-SHA-512, user 'svc'" in message
    assert SASL_PASSWORD not in message
    assert caplog.records and SASL_PASSWORD not in caplog.text


def test_security_is_given_once(broker: EmbeddedBroker) -> None:
    with pytest.raises(ConfigError, match="security given twice"):
        FeedbackProducer(broker.bootstrap, security=KafkaSecurity(),
                         security_protocol="PLAINTEXT")
    plain = FeedbackProducer(broker.bootstrap, security_protocol="PLAINTEXT")  # kafka-python's
    plain.close()


def test_close_fails_what_its_timeout_left_queued_and_raises_nothing(tmp_path: Path) -> None:
    """A close in a ``finally`` (Ctrl-C while producing, the broker gone) must end, not replace
    the exception being handled: kafka-python's close raised ``KafkaTimeoutError`` here."""
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as gone:
        producer = FeedbackProducer(gone.bootstrap, topic="close-test", max_block_ms=2000)
        producer.log_copy(session_id="s", user_id="u", request_id="r", response_id="a")
        producer.flush()
    for i in range(20):  # the broker is gone: queued, never sent
        producer.log_copy(session_id=f"s{i}", user_id="u", request_id="r", response_id="a")
    started = time.monotonic()
    producer.close(timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert (producer.sent, producer.failed, producer.pending) == (1, 20, 0)
    assert len(producer.take_undelivered()) == 20
