"""Security: Kafka TLS/SASL for both client libraries, pseudonymous user ids, text redaction,
an owner-only data dir, and secrets that never show in errors, logs, files or summaries.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from hypothesis import given
from hypothesis import strategies as st
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from pydantic import SecretStr, ValidationError
from tls_broker import Pki, TlsBroker, make_pki, server_context

from prefstream.cli import main
from prefstream.errors import ConfigError
from prefstream.schemas.events import EVENT_ADAPTER, MAX_ID_CHARS
from prefstream.settings import KafkaSecurity, Settings, faust_credentials, kafka_python_config
from prefstream.sim.traffic import TrafficConfig, generate_traffic
from prefstream.storage.catalog import connect_readonly, ensure_catalog
from prefstream.storage.files import init_data_dir
from prefstream.storage.tables import TABLES
from prefstream.streams.core.outputs import pseudonym, scrub_raw, scrub_text
from prefstream.streams.worker.pipeline import MemoryStore, Pipeline, replay

KEY_PASSWORD = "tls-key-pw-6Rq1"
SASL_PASSWORD = "sasl-pw-J4vX9"
PSEUDONYM_KEY = "pseudonym-key-Zt8wQ"
SECRETS = (KEY_PASSWORD, SASL_PASSWORD, PSEUDONYM_KEY)
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), KEY_PASSWORD)


def security(protocol: str, pki: Pki, mechanism: str = "PLAIN") -> KafkaSecurity:
    tls = dict(ssl_cafile=pki.ca, ssl_certfile=pki.client_cert, ssl_keyfile=pki.client_key,
               ssl_key_password=KEY_PASSWORD) if protocol.endswith("SSL") else {}
    sasl = dict(sasl_mechanism=mechanism, sasl_username="svc",
                sasl_password=SASL_PASSWORD) if protocol.startswith("SASL") else {}
    return KafkaSecurity(protocol=protocol, **tls, **sasl)


# --- the keywords each client library gets ---------------------------------------------------

KEYS = {
    "PLAINTEXT": {"security_protocol"},
    "SSL": {"security_protocol", "ssl_context"},
    "SASL_PLAINTEXT": {"security_protocol", "sasl_mechanism", "sasl_plain_username",
                       "sasl_plain_password"},
    "SASL_SSL": {"security_protocol", "ssl_context", "sasl_mechanism", "sasl_plain_username",
                 "sasl_plain_password"},
}


@pytest.mark.parametrize(("protocol", "mechanism"), [
    ("PLAINTEXT", "PLAIN"), ("SSL", "PLAIN"), ("SASL_PLAINTEXT", "PLAIN"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-256"), ("SASL_SSL", "SCRAM-SHA-512"), ("SASL_SSL", "PLAIN"),
])
def test_kafka_python_and_faust_get_the_same_connection(pki: Pki, protocol: str,
                                                        mechanism: str) -> None:
    sec = security(protocol, pki, mechanism)
    context = sec.ssl_context()
    config = kafka_python_config(sec, context)
    assert set(config) == KEYS[protocol] and config["security_protocol"] == protocol
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(config) <= set(client.DEFAULT_CONFIG), client  # keywords it accepts
    if protocol.startswith("SASL"):
        assert (config["sasl_mechanism"], config["sasl_plain_username"],
                config["sasl_plain_password"]) == (mechanism, "svc", SASL_PASSWORD)
    faust_side = credentials_to_aiokafka_auth(faust_credentials(sec, context))
    assert faust_side["security_protocol"] == protocol
    for key in KEYS[protocol] - {"ssl_context"}:
        assert faust_side[key] == config[key], key
    if "ssl_context" in config:
        assert faust_side["ssl_context"] is config["ssl_context"] is context


def test_the_worker_app_is_built_with_the_credentials(pki: Pki, tmp_path: Path) -> None:
    from prefstream.streams.worker.app import create_app

    settings = Settings(kafka_bootstrap="127.0.0.1:9", data_dir=tmp_path, metrics_port=0,
                        kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-256",
                        kafka_sasl_username="svc", kafka_sasl_password=SASL_PASSWORD,
                        kafka_ssl_cafile=pki.ca)
    auth = credentials_to_aiokafka_auth(create_app(settings).conf.broker_credentials)
    assert (auth["security_protocol"], auth["sasl_mechanism"], auth["sasl_plain_username"],
            auth["sasl_plain_password"]) == ("SASL_SSL", "SCRAM-SHA-256", "svc", SASL_PASSWORD)
    assert auth["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> dict[str, Any]:
    """One real TLS handshake over loopback; the peer certificate the server saw."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, Any] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                seen.update(tls.getpeercert() or {})
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(timeout=10)
        listener.close()
    return seen


def test_the_tls_context_verifies_the_broker_and_presents_the_client_cert(pki: Pki) -> None:
    context = security("SSL", pki).ssl_context()
    assert context is not None and context.check_hostname
    peer = _handshake(context, server_context(pki))
    assert ((("commonName", "client"),),) == tuple(
        x for x in peer["subject"] if x[0][0] == "commonName")
    stranger = KafkaSecurity(protocol="SSL", ssl_cafile=pki.other_ca).ssl_context()
    assert stranger is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(stranger, server_context(pki))


# --- misconfigurations fail early, clearly, and without echoing secrets ----------------------

@pytest.mark.parametrize(("fields", "message"), [
    ({"kafka_security_protocol": "SASL_SSL"}, "needs a SASL username and password"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_password": SASL_PASSWORD},
     "needs a SASL username and password"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "KEY"}, "needs its certificate"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_key_password": KEY_PASSWORD},
     "needs a client certificate"),
    ({"kafka_security_protocol": "SSL", "kafka_bootstrap": None}, "speaks PLAINTEXT only"),
    ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
    ({"kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism"),
    ({"kafka_ssl_cafile": "/no/such/ca.pem"}, "kafka_ssl_cafile"),
    ({"kafka_sasl_password": SASL_PASSWORD, "pseudonym_key": PSEUDONYM_KEY,
      "rules": {"partition_hours": 5}}, "partition_hours must divide 24"),
])
def test_bad_settings_fail_with_a_clear_error_that_shows_no_secret(
        pki: Pki, fields: dict[str, Any], message: str) -> None:
    given_fields = {"kafka_bootstrap": "127.0.0.1:9", **fields}
    if given_fields.get("kafka_ssl_keyfile") == "KEY":
        given_fields["kafka_ssl_keyfile"] = pki.client_key
    with pytest.raises(ValidationError) as err:
        Settings(**given_fields)
    assert message in str(err.value)
    assert not any(s in str(err.value) for s in SECRETS)


def test_tls_files_that_do_not_load_fail_with_a_clear_error(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    cases = [
        (KafkaSecurity(protocol="SSL", ssl_cafile=not_pem), "cannot load the CA file"),
        (KafkaSecurity(protocol="SSL", ssl_cafile=pki.ca, ssl_certfile=pki.client_cert,
                       ssl_keyfile=pki.client_key, ssl_key_password="wrong-password"),
         "cannot load the client certificate"),
        (KafkaSecurity(protocol="SASL_SSL", sasl_username="svc", sasl_password=SASL_PASSWORD,
                       ssl_certfile=pki.client_cert, ssl_keyfile=pki.server_key),
         "cannot load the client certificate"),  # a key that is not the certificate's
    ]
    for sec, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            sec.kafka_python_config()
        assert not any(s in str(err.value) for s in SECRETS)


def test_the_cli_exits_2_on_bad_security_settings_and_prints_no_secret(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    for name in [n for n in os.environ if n.startswith("PREFSTREAM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PREFSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    monkeypatch.setenv("PREFSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("PREFSTREAM_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv("PREFSTREAM_PSEUDONYM_KEY", PSEUDONYM_KEY)
    assert main(["worker", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a SASL username and password" in err
    assert not any(s in err for s in SECRETS)


def test_secrets_are_masked_everywhere_but_the_child_environment(pki: Pki) -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:9", kafka_security_protocol="SASL_SSL",
                        kafka_sasl_username="svc", kafka_sasl_password=SASL_PASSWORD,
                        kafka_ssl_cafile=pki.ca, kafka_ssl_certfile=pki.client_cert,
                        kafka_ssl_keyfile=pki.client_key, kafka_ssl_key_password=KEY_PASSWORD,
                        pseudonym_key=PSEUDONYM_KEY)
    shown = [repr(settings), str(settings), settings.model_dump_json(),
             repr(settings.kafka_security()), settings.kafka_security().describe(),
             repr(settings.kafka_security().faust_credentials())]
    assert not any(s in text for s in SECRETS for text in shown)
    env = settings.as_env()  # what a worker process is started with: it needs the real values
    assert {env["PREFSTREAM_KAFKA_SASL_PASSWORD"], env["PREFSTREAM_KAFKA_SSL_KEY_PASSWORD"],
            env["PREFSTREAM_PSEUDONYM_KEY"]} == set(SECRETS)
    assert Settings(**{k.removeprefix("PREFSTREAM_").lower(): v for k, v in env.items()}
                    ).kafka_client_config()["sasl_plain_password"] == SASL_PASSWORD


# --- pseudonyms and redaction (pure) ---------------------------------------------------------

def test_pseudonym_is_a_standard_hmac_sha256_prefix() -> None:
    # RFC 2104 HMAC-SHA256 test vector: the same in any process, language or restart
    fox = "The quick brown fox jumps over the lazy dog"
    assert pseudonym(fox, SecretStr("key")) == "f7bc83f430538424b13298e6aa6fb143"


@given(st.from_regex(rf"[\w.:@/+=-]{{1,{MAX_ID_CHARS}}}", fullmatch=True),
       st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_pseudonyms_are_valid_ids_and_depend_on_the_key(user: str, key: str, other: str) -> None:
    p = pseudonym(user, SecretStr(key))
    assert p == pseudonym(user, SecretStr(key)) and len(p) == 32
    assert (p == pseudonym(user, SecretStr(other))) == (key == other)
    copy = {"type": "copy", "event_id": "e", "session_id": "s", "user_id": p, "request_id": "r",
            "response_id": "a", "ts": "2026-01-01T00:00:00Z"}
    assert EVENT_ADAPTER.validate_json(json.dumps(copy)).user_id == p  # state reloads it


@given(st.text(), st.text())
def test_redacted_texts_stay_distinct_and_checkable(a: str, b: str) -> None:
    ra, rb = scrub_text(a, "redact"), scrub_text(b, "redact")
    assert (ra == rb) == (a == b)
    assert ra.endswith(f" len:{len(a)}>") and ra.startswith("<redacted sha256:")
    assert scrub_text(a, "full") == a and scrub_text(a, "drop") == ""


def test_raw_messages_are_scrubbed_field_by_field_or_withheld() -> None:
    key = SecretStr(PSEUDONYM_KEY)
    bad = {"type": "impression", "user_id": "u-secret-7", "prompt": "my address is 1 Main St",
           "position": "first", "email": "me@example.com"}
    raw = json.dumps(bad).encode()
    assert scrub_raw(raw, pseudonym_key=None, text_storage="full") == raw.decode()
    kept = json.loads(scrub_raw(raw, pseudonym_key=key, text_storage="full"))
    assert kept == {**bad, "user_id": pseudonym("u-secret-7", key)}
    redacted = json.loads(scrub_raw(raw, pseudonym_key=key, text_storage="redact"))
    assert redacted["prompt"] == scrub_text(bad["prompt"], "redact")
    assert redacted["email"] == scrub_text("me@example.com", "redact")  # unknown: free text
    assert redacted["position"] == "first"  # a field of the schema, kept for debugging
    assert json.loads(scrub_raw(raw, pseudonym_key=None, text_storage="drop"))["prompt"] == ""
    numeric = json.loads(scrub_raw(b'{"user_id": 42}', pseudonym_key=key, text_storage="full"))
    assert numeric["user_id"] == pseudonym("42", key)
    junk = b"user u-secret-7 typed {not json"
    assert scrub_raw(junk, pseudonym_key=key, text_storage="full") == scrub_text(
        junk.decode(), "redact")
    assert scrub_raw(junk, pseudonym_key=None, text_storage="drop") == ""
    assert len(scrub_raw(raw, pseudonym_key=key, text_storage="full", limit=20)) == 20


@pytest.mark.parametrize("raw", [
    b"[" * 100_000,  # deeper than Python's JSON parser goes
    b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    b'{"user_id": "\\ud800"}',  # a lone surrogate: valid JSON, no UTF-8 string to hash
    b'{"event_id": "\\udc00", "user_id": "u-secret-7"}',  # ...in a field kept as sent
    b'{"prompt": "\\ud83d"}',
], ids=["deep-array", "deep-object", "surrogate-user", "surrogate-id", "surrogate-text"])
def test_raw_messages_that_cannot_be_scrubbed_are_withheld_not_raised(raw: bytes) -> None:
    """Hostile JSON that Python parses differently from the worker's validator (or not at
    all) is kept as its hash and length, or dropped; the dead letter is still written."""
    key = SecretStr(PSEUDONYM_KEY)
    whole = scrub_text(raw.decode(), "redact")
    assert scrub_raw(raw, pseudonym_key=key, text_storage="full") == whole
    assert scrub_raw(raw, pseudonym_key=key, text_storage="redact") == whole
    scrub_raw(raw, pseudonym_key=None, text_storage="drop").encode()  # storable as UTF-8


# --- the pipeline stores no raw user id, and texts as configured -----------------------------

RAW_USER = "u-secret-7"
EXTRA = [  # a dead letter that parses, one that does not, both naming a user
    (b"s-x", json.dumps({"type": "copy", "user_id": RAW_USER, "session_id": "s-x"}).encode()),
    (b"s-x", f"user {RAW_USER} typed {{not json".encode()),
]


def _records(messages: list[tuple[bytes, bytes]], partitions: int) -> list[tuple]:
    offsets = [0] * partitions
    now_ms = int(T0.timestamp() * 1000) + 3_600_000
    out = []
    for key, value in messages:
        p = zlib.crc32(key) % partitions
        out.append((p, offsets[p], key, value, now_ms))
        offsets[p] += 1
    return out


def _replay(data_dir: Path, **privacy: Any) -> dict[str, list[dict[str, Any]]]:
    traffic = generate_traffic(TrafficConfig(n_events=300, seed=11, end=T0))
    settings = Settings(data_dir=data_dir, partitions=2, **privacy)
    init_data_dir(data_dir)
    replay(settings, _records(traffic.messages + EXTRA, 2),
           final_tick_ms=int(T0.timestamp() * 1000) + 10**9)
    ensure_catalog(data_dir)
    con = connect_readonly(data_dir)
    try:
        return {t: _rows(con, t) for t in TABLES}
    finally:
        con.close()


def _rows(con: duckdb.DuckDBPyConnection, table: str) -> list[dict[str, Any]]:
    cur = con.execute(f"SELECT * FROM {table}")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@pytest.fixture(scope="module")
def replays(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("replays")
    old = os.umask(0o022)  # a permissive umask: the files must be private anyway
    try:
        return {"full": _replay(root / "full"),
                "private": _replay(root / "private", pseudonym_key=PSEUDONYM_KEY,
                                   text_storage="redact"),
                "drop": _replay(root / "drop", text_storage="drop"), "root": root}
    finally:
        os.umask(old)


def test_no_stored_row_carries_a_raw_user_id(replays: dict[str, Any]) -> None:
    full, private = replays["full"], replays["private"]
    raw_users = {r["user_id"] for r in full["sessions"]} | {RAW_USER}
    key = SecretStr(PSEUDONYM_KEY)
    for table in ("pairs", "ties", "unpaired", "refusals", "sessions"):
        assert len(private[table]) == len(full[table]) > 0, table
        by_id = {r[TABLES[table][1]]: r for r in full[table]}
        for row in private[table]:
            assert row["user_id"] == pseudonym(by_id[row[TABLES[table][1]]]["user_id"], key)
    cells = [str(v) for rows in private.values() for row in rows for v in row.values()]
    assert not any(u in cell for u in raw_users for cell in cells)
    assert not any(PSEUDONYM_KEY in cell for cell in cells)
    late = [json.loads(r["raw"]) for r in private["late_events"]]
    assert late and all(len(e["user_id"]) == 32 for e in late)
    previews = {r["raw"] for r in private["dead_letters"]}
    assert any(p.startswith("{") and json.loads(p)["user_id"] == pseudonym(RAW_USER, key)
               for p in previews)
    assert scrub_text(EXTRA[1][1].decode(), "redact") in previews


def test_texts_are_stored_as_text_storage_says(replays: dict[str, Any]) -> None:
    full, private, drop = replays["full"], replays["private"], replays["drop"]
    columns = {"pairs": ("prompt", "chosen", "rejected"), "ties": ("prompt", "response_a",
               "response_b"), "unpaired": ("prompt", "completion")}
    for table, cols in columns.items():
        want = {r[TABLES[table][1]]: r for r in full[table]}
        assert {r[TABLES[table][1]] for r in private[table]} == set(want)  # same ids
        for row in private[table]:
            for c in cols:
                assert row[c] == scrub_text(want[row[TABLES[table][1]]][c], "redact")
        assert all(row[c] == "" for row in drop[table] for c in cols)
        assert len(drop[table]) == len(want)
    assert all(p["chosen"] != p["rejected"] for p in private["pairs"])
    late = [json.loads(r["raw"]) for r in drop["late_events"]]
    assert late and all(e.get(f, "") == "" for e in late
                        for f in ("prompt", "response_text", "edited_text"))


def test_side_topics_get_the_scrubbed_payloads(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, partitions=1, pseudonym_key=PSEUDONYM_KEY,
                        text_storage="redact")
    pipeline = Pipeline(settings, MemoryStore())
    [dead] = pipeline.handle(topic=settings.events_topic, partition=0, offset=0, key=b"s-x",
                             value=EXTRA[0][1], timestamp_ms=int(T0.timestamp() * 1000))
    payload = json.loads(dead.value)
    assert dead.topic == settings.dead_letter_topic and RAW_USER not in dead.value.decode()
    assert json.loads(payload["raw"])["user_id"] == pseudonym(RAW_USER, SecretStr(PSEUDONYM_KEY))


def test_files_written_by_the_pipeline_are_owner_only(replays: dict[str, Any]) -> None:
    root: Path = replays["root"]
    for data_dir in (root / "full", root / "private"):
        dirs = [data_dir, *(p for p in data_dir.rglob("*") if p.is_dir())]
        assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in dirs)
        parquet = list(data_dir.rglob("*.parquet"))
        assert len(parquet) > 20
        assert {stat.S_IMODE(f.stat().st_mode) for f in parquet} == {0o600}


# --- end to end: the demo over mutual TLS, with every secret set -----------------------------

@pytest.fixture(scope="module")
def tls_demo(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("tls-demo")
    data_dir = root / "data"
    with TlsBroker(pki, log_path=root / "broker.log") as broker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFSTREAM_")}
        env.update({
            "PREFSTREAM_KAFKA_BOOTSTRAP": broker.bootstrap,
            "PREFSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL",
            "PREFSTREAM_KAFKA_SSL_CAFILE": str(pki.ca),
            "PREFSTREAM_KAFKA_SSL_CERTFILE": str(pki.client_cert),
            "PREFSTREAM_KAFKA_SSL_KEYFILE": str(pki.client_key),
            "PREFSTREAM_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
            "PREFSTREAM_KAFKA_SASL_USERNAME": "svc",  # not used by SSL: warned about, not shown
            "PREFSTREAM_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
            "PREFSTREAM_PSEUDONYM_KEY": PSEUDONYM_KEY,
            "PREFSTREAM_TEXT_STORAGE": "redact",
            "PREFSTREAM_DEMO_WORKER_LOGLEVEL": "info",
        })
        out = subprocess.run(
            [sys.executable, "-m", "prefstream.cli", "-v", "demo", "--events", "400", "--seed",
             "4", "--data-dir", str(data_dir), "--json", "--no-train"],
            capture_output=True, text=True, timeout=240, env=env)
        handshakes = broker.handshakes
    assert out.returncode == 0, out.stderr[-3000:]
    status = subprocess.run([sys.executable, "-m", "prefstream.cli", "status", "--data-dir",
                             str(data_dir), "--json"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert status.returncode == 0, status.stderr[-2000:]
    yield {"summary": json.loads(out.stdout), "stdout": out.stdout, "stderr": out.stderr,
           "status": status.stdout + status.stderr, "data_dir": data_dir, "root": root,
           "handshakes": handshakes}


@pytest.mark.broker
def test_the_demo_runs_every_client_over_mutual_tls(tls_demo: dict[str, Any]) -> None:
    summary = tls_demo["summary"]
    assert summary["balanced"] and summary["pairs"] > 0 and summary["dead_lettered"] > 0
    # admin + producer + consumer of the demo process, and the worker's (Faust/aiokafka)
    assert tls_demo["handshakes"] >= 4
    assert "does not use kafka_sasl_username, kafka_sasl_password" in (
        tls_demo["data_dir"] / "worker.log").read_text()


@pytest.mark.broker
def test_no_secret_in_any_output_log_file_or_row(tls_demo: dict[str, Any]) -> None:
    texts = [tls_demo["stdout"], tls_demo["stderr"], tls_demo["status"]]
    files = [p for p in tls_demo["root"].rglob("*") if p.is_file()]
    assert {"worker.log", "broker.log", "prefstream.duckdb"} <= {p.name for p in files}
    for secret in SECRETS:
        assert not any(secret in text for text in texts), secret
        assert not any(secret.encode() in p.read_bytes() for p in files), secret
    con = connect_readonly(tls_demo["data_dir"])
    try:
        cells = [str(v) for t in TABLES for row in con.execute(f"SELECT * FROM {t}").fetchall()
                 for v in row]
    finally:
        con.close()
    assert len(cells) > 1000 and not any(s in c for s in SECRETS for c in cells)


@pytest.mark.broker
def test_the_demo_stores_pseudonyms_and_redacted_texts(tls_demo: dict[str, Any]) -> None:
    summary = tls_demo["summary"]
    traffic = generate_traffic(TrafficConfig(
        n_events=summary["traffic"]["events"], seed=summary["traffic"]["seed"],
        end=datetime.fromisoformat(summary["traffic"]["end"])))
    raw_users = {json.loads(v)["user_id"] for _, v in traffic.messages
                 if v.startswith(b"{") and '"user_id":"' in v.decode()}
    con = connect_readonly(tls_demo["data_dir"])
    try:
        stored = {u for (u,) in con.execute("SELECT user_id FROM sessions UNION "
                                            "SELECT user_id FROM pairs").fetchall()}
        texts = con.execute("SELECT prompt, chosen, rejected FROM pairs").fetchall()
    finally:
        con.close()
    key = SecretStr(PSEUDONYM_KEY)
    assert stored and stored <= {pseudonym(u, key) for u in raw_users}  # the worker's key
    assert not stored & raw_users
    assert all(t.startswith("<redacted sha256:") for row in texts for t in row)


@pytest.mark.broker
def test_the_whole_data_dir_is_owner_only(tls_demo: dict[str, Any]) -> None:
    data_dir: Path = tls_demo["data_dir"]
    entries = [data_dir, *data_dir.rglob("*")]
    assert {"faust", "watermarks", "worker.log"} <= {p.name for p in entries}
    for path in entries:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, path
        else:
            assert mode & 0o077 == 0, (path, oct(mode))


@pytest.mark.slow
def test_metrics_endpoint_outlives_a_silent_client_without_a_thread_per_scrape() -> None:
    """A client that connects and sends nothing is dropped after the handler's timeout; scrapes
    are served on the endpoint's one thread, never a new thread each."""
    import urllib.request

    from prefstream.streams import metrics
    from prefstream.streams.broker import free_port

    port = free_port()
    server = metrics.serve(lambda: "up 1\n", host="127.0.0.1", port=port)
    assert server is not None
    silent = socket.create_connection(("127.0.0.1", port))  # holds the server's one thread
    try:
        threads = threading.active_count()
        url = f"http://127.0.0.1:{port}/metrics"
        for _ in range(20):
            with urllib.request.urlopen(url, timeout=30) as response:
                assert response.read() == b"up 1\n"
        assert threading.active_count() == threads
    finally:
        silent.close()
        server.shutdown()
        server.server_close()
