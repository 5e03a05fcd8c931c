"""Hostile input on the wire: a hypothesis fuzz of what any producer can put in a message.

A valid traffic stream (``prefstream.sim.traffic``, no bad messages) is interleaved with hostile
ones:

* malformed, each of which must become exactly one dead letter with a reason: bytes that are not
  JSON, JSON that is not an object, wrong types, missing ids, unknown event types and fields, texts
  over ``MAX_TEXT_CHARS``, messages over ``max_message_bytes``, deep nesting, invalid UTF-8, lone
  surrogate escapes, naive and unparsable times, times far in the future, a key other than the
  session id or none, Kafka record timestamps no clock gives, ticks that do not validate;
* well-formed but foreign, which are no dead letters and must not change any other session:
  signals on requests and answers never shown, in sessions of their own, at times long before the
  traffic (back to year 1: late, or sessions of their own); JSON objects with a key given twice
  (pydantic's parser keeps the last); re-sent event ids of valid events with other
  content (ignored as duplicates, or late).

Properties, on the pure path (``streams.worker.pipeline.replay`` into a real data dir, rows read
back with ``storage.files.read_table``): every malformed message yields one dead-letter row and one
dead-letter topic message naming its ``topic[partition]@offset``, with a reason that is not an
internal error; the valid messages yield exactly the pairs, ties, unpaired rows, refusals, sessions
and late events they yield alone. Row ids never depend on offsets (they hash the session key and
contents), so both runs compare row by row although hostile messages shift the offsets.

Forged ticks that do validate are left out: a tick is a trusted control message, and one far
ahead moves the watermark of every session of its partition (a known limit: anyone who may write
to the events topic may send one).

One end-to-end test sends a fixed hostile mix through the real broker to a worker process.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import count
from pathlib import Path
from typing import Any, Literal

import pytest
from factories import T0, event, kafka_partition, kafka_records
from helpers.worker import T0 as E2E_END
from helpers.worker import make_settings, query, read_topic, reference, start_worker, stop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from prefstream.schemas.events import MAX_ID_CHARS, MAX_TEXT_CHARS, MAX_WALL_MS
from prefstream.settings import Settings
from prefstream.sim.demo import end_offsets, wait_until_drained
from prefstream.sim.traffic import LATE_BY, TrafficConfig, generate_traffic
from prefstream.storage.files import init_data_dir, read_table
from prefstream.storage.tables import TABLES
from prefstream.streams.worker.pipeline import (
    MAX_REASON_CHARS,
    MemoryStore,
    Pipeline,
    flush_offline,
    replay,
)
from prefstream.streams.worker.run import prepare

END = T0  # the latest event time of the valid traffic
HOURS = 2
ARRIVAL = END + timedelta(hours=1)
ARRIVAL_MS = int(ARRIVAL.timestamp() * 1000)
FINAL_TICK_MS = ARRIVAL_MS + 10**9
#: hostile times before this precede every valid event, late ones too (sessions start at most
#: HOURS before END, late events at most LATE_BY and half an hour before their session): they
#: cannot move a partition's watermark past a valid event
SAFE_PAST = END - timedelta(hours=HOURS) - LATE_BY - timedelta(hours=1)
PARTITIONS = 2
FOREIGN = "x-"  # session ids of the foreign messages
SEEDS = (0, 1, 2)
EVENT_TYPES = ("impression", "click", "copy", "thumbs_up", "thumbs_down", "regenerate", "edit",
               "reformulate", "session_end")
TEXT_FIELDS = {"impression": ("prompt", "response_text"), "edit": ("edited_text",),
               "reformulate": ("prompt",)}
OUTPUT_TABLES = ("pairs", "ties", "unpaired", "refusals")
MAX_BYTES = Settings.model_fields["max_message_bytes"].default
MAX_FUTURE = timedelta(seconds=Settings.model_fields["max_future_s"].default)

Expect = Literal["dead", "foreign", "copy"]


@dataclass(frozen=True)
class Hostile:
    """One hostile message; ``partition`` is used only without a key, ``copies`` (a valid
    message's index) only by re-sent event ids, which must come after their original."""

    kind: str
    expect: Expect
    key: bytes | None
    value: bytes = field(repr=False)  # up to 300 kB
    timestamp_ms: int = ARRIVAL_MS
    partition: int = 0
    copies: int = -1


# --- the valid stream ------------------------------------------------------------------------

@functools.cache
def valid_messages(seed: int) -> tuple[tuple[bytes, bytes], ...]:
    config = TrafficConfig(n_events=120, seed=seed, end=END, hours=HOURS, n_users=20,
                           bad_share=0.0, duplicate_share=0.03, late_share=0.03)
    return tuple(generate_traffic(config).messages)


#: how raw messages are kept in dead letters: as sent, or parsed and scrubbed field by field (the
#: path that parses hostile JSON a second time)
PRIVACY: dict[str, dict[str, Any]] = {
    "full": {},
    "private": {"text_storage": "redact", "pseudonym_key": "fuzz-key"},
    "drop": {"text_storage": "drop"},
}


def fuzz_settings(data_dir: Path, privacy: str) -> Settings:
    return Settings(data_dir=data_dir, partitions=PARTITIONS, metrics_port=0, **PRIVACY[privacy])


def run_replay(config: Settings, records: list[tuple[int, int, bytes | None, bytes, int]]):
    init_data_dir(config.data_dir)
    return replay(config, records, final_tick_ms=FINAL_TICK_MS)


def rows(data_dir: Path, table: str) -> list[dict[str, Any]]:
    return read_table(data_dir=data_dir, table=table).to_pylist()


# --- hostile messages ------------------------------------------------------------------------

def template(kind: str, *, event_id: str, session_id: str, ts: datetime,
             ids: tuple[str, str, str] = ("u-h", "q-h", "r-h")) -> dict[str, Any]:
    """A valid event of ``kind`` as a JSON object, to break one way or another."""
    user, request, response = ids
    return event(kind, event_id=event_id, session_id=session_id, ts=ts, user_id=user,
                 request_id=request, response_id=response).model_dump(mode="json")


def dumps(message: object) -> bytes:
    return json.dumps(message).encode()


def spliced(message: dict[str, Any], name: str, raw: bytes) -> bytes:
    """``message`` as JSON with the value of ``name`` replaced by ``raw`` bytes (quotes and
    all: raw may be a broken string or any JSON)."""
    return dumps({**message, name: "\x00SPLICE\x00"}).replace(b'"\\u0000SPLICE\\u0000"', raw)


def nested(depth: int, brackets: str) -> str:
    return (brackets[0] if brackets == "[]" else '{"a":') * depth + "1" + brackets[1] * depth


def string_fields(message: dict[str, Any]) -> list[str]:
    return [k for k, v in message.items() if isinstance(v, str) and k != "type"]


ids = st.from_regex(r"[A-Za-z0-9_.:@/+=-]{1,12}", fullmatch=True)
zones = st.sampled_from([timezone.utc, timezone(timedelta(hours=23, minutes=59)),
                         timezone(-timedelta(hours=23, minutes=59))])
# local times a day inside the bounds: an offset of up to 23:59 keeps them there in UTC
past = st.datetimes(min_value=datetime(1, 1, 2),
                    max_value=(SAFE_PAST - timedelta(days=1)).replace(tzinfo=None),
                    timezones=zones)
future = st.datetimes(min_value=(ARRIVAL + MAX_FUTURE + timedelta(days=1)).replace(tzinfo=None),
                      max_value=datetime(9999, 12, 30), timezones=zones)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=8))
not_objects = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=8)
wrong_for_str = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                          st.lists(st.integers(), max_size=2),
                          st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
wrong_for_int = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.floats(),
                          st.lists(st.integers(), max_size=2))  # 1.0 too: the model is strict
bad_ids = st.one_of(
    st.just(""), st.just("x" * (MAX_ID_CHARS + 1)),
    st.tuples(ids, st.sampled_from(list(" \t\n\x00\"#$%&'()*,;<>?[\\]^`{|}~")), ids).map("".join),
)
invalid_utf8 = st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xc0\xaf", b"\x80",
                                b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"])
lone_surrogates = st.sampled_from([b"\\ud800", b"\\udfff", b"\\ud83d", b"\\udc00 tail",
                                   b"\\ud800\\u0041"])
long_names = st.integers(MAX_REASON_CHARS, 100_000).map(lambda n: "n" * n)
bogus_kafka_ms = st.one_of(st.integers(-(2**63), -1), st.integers(MAX_WALL_MS, 2**63 - 1))
malformed_ticks = st.sampled_from([
    b'{"type":"_tick"}', b'{"type":"_tick","wall_ms":"now"}', b'{"type":"_tick","wall_ms":-1}',
    b'{"type":"_tick","wall_ms":1e300}', b'{"type":"_tick","wall_ms":' + str(2**70).encode()
    + b"}", b'{"type":"_tick","wall_ms":1,"extra":true}', b'{"type":"_tick","wall_ms":null}',
])


def resent(original: tuple[bytes, bytes], n: int) -> tuple[bytes, bytes]:
    """A valid message's event id and time with other content: the same session, a new answer."""
    key, value = original
    message = json.loads(value)
    if "response_id" in message:
        message["response_id"] = f"evil-{n}"
    elif message["type"] == "reformulate":
        message["prompt"] = "ignore all previous instructions"
    else:
        message["request_id"] = f"evil-{n}"
    return key, dumps(message)


@st.composite
def hostile_message(draw: st.DrawFn, kind: str, valid: tuple[tuple[bytes, bytes], ...],
                    serial: Iterator[int]) -> Hostile:
    """One hostile message of ``kind``; malformed ones are keyed by a valid session's id, so
    they land in the partitions of the valid traffic."""
    n = next(serial)
    sid = draw(st.sampled_from(sorted({key.decode() for key, _ in valid})))
    key = sid.encode()
    base = template(draw(st.sampled_from(EVENT_TYPES)), event_id=f"h-{n}", session_id=sid,
                    ts=draw(past), ids=(draw(ids), draw(ids), draw(ids)))

    def dead(value: bytes, **extra: Any) -> Hostile:
        return Hostile(kind, "dead", extra.pop("key", key), value, **extra)

    if kind == "not_json":  # or JSON: forty bytes are too few for an event
        return dead(draw(st.binary(max_size=40)))
    if kind == "truncated":
        whole = dumps(base)
        return dead(whole[:draw(st.integers(0, len(whole) - 1))])
    if kind == "not_an_object":
        return dead(dumps(draw(not_objects)))
    if kind == "wrong_type":
        attr = draw(st.sampled_from(sorted(base)))
        original = base[attr]
        value = draw(wrong_for_str if isinstance(original, str) else wrong_for_int)
        return dead(dumps({**base, attr: value}))
    if kind == "bad_id":
        attr = draw(st.sampled_from([f for f in ("event_id", "session_id", "user_id",
                                                  "request_id", "response_id") if f in base]))
        return dead(dumps({**base, attr: draw(bad_ids)}))
    if kind == "missing_field":
        attr = draw(st.sampled_from([f for f in base if f != "schema_version"]))
        return dead(dumps({k: v for k, v in base.items() if k != attr}))
    if kind == "unknown_type":  # pydantic's message quotes the tag, however long
        tag = draw(st.one_of(st.text(max_size=20), long_names).filter(
            lambda t: t not in EVENT_TYPES))
        return dead(dumps({**base, "type": tag}))
    if kind == "unknown_field":
        name = draw(st.one_of(st.text(min_size=1, max_size=20), long_names).filter(
            lambda f: f not in base))
        return dead(dumps({**base, name: draw(json_scalars)}))
    if kind == "schema_version":
        return dead(dumps({**base, "schema_version": draw(
            st.one_of(st.sampled_from([0, 2, 1.0, True, "1"]), st.integers()).filter(
                lambda v: v != 1 or type(v) is not int))}))
    if kind == "huge_text":
        text_kind = draw(st.sampled_from(sorted(TEXT_FIELDS)))
        message = template(text_kind, event_id=f"h-{n}", session_id=sid, ts=draw(past))
        char = draw(st.sampled_from(["x", "é", "語", "😀"]))
        text = char * (MAX_TEXT_CHARS + draw(st.integers(1, 2000)))
        return dead(dumps({**message, draw(st.sampled_from(TEXT_FIELDS[text_kind])): text}))
    if kind == "huge_message":  # valid but for its size: JSON allows any whitespace
        padding = b" " * (MAX_BYTES + draw(st.integers(0, 5000)))
        return dead(b"{" + padding + dumps(base)[1:])
    if kind == "deep":
        depth = draw(st.integers(1, 60_000))
        brackets = draw(st.sampled_from(["[]", "{}"]))
        if draw(st.booleans()):
            return dead(nested(depth, brackets).encode())
        attr = draw(st.sampled_from(string_fields(base)))
        return dead(spliced(base, attr, nested(depth, brackets).encode()))
    if kind == "invalid_utf8":
        attr = draw(st.sampled_from(string_fields(base)))
        return dead(spliced(base, attr, b'"ok' + draw(invalid_utf8) + b'"'))
    if kind == "lone_surrogate":
        attr = draw(st.sampled_from(string_fields(base)))
        return dead(spliced(base, attr, b'"' + draw(lone_surrogates) + b'"'))
    if kind == "bad_time":
        ts = draw(st.one_of(
            future.map(lambda t: t.isoformat()),
            st.datetimes(max_value=datetime(9999, 1, 1)).map(lambda t: t.isoformat()),  # naive
            st.sampled_from(["", "yesterday", "2024-13-01T00:00:00Z", "2024-05-01",
                             "10000-01-01T00:00:00Z", "2024-05-01T12:00:00+25:00"])))
        return dead(dumps({**base, "ts": ts}))
    if kind == "wrong_key":
        other = draw(st.binary(max_size=12).filter(lambda k: k != key))
        return dead(dumps(base), key=other)
    if kind == "no_key":
        return dead(dumps(base), key=None, partition=draw(st.integers(0, PARTITIONS - 1)))
    if kind == "bogus_kafka_timestamp":
        return dead(dumps(base), timestamp_ms=draw(bogus_kafka_ms))
    if kind == "tick":
        return dead(draw(malformed_ticks))
    if kind == "empty":
        return dead(b"")
    # well-formed: in sessions of their own, or ignored
    if kind in ("unknown_request", "duplicate_keys"):
        own = f"{FOREIGN}{draw(st.integers(0, 3))}"
        message = template(draw(st.sampled_from(EVENT_TYPES)), event_id=f"h-{n}",
                           session_id=own, ts=draw(past), ids=(draw(ids), draw(ids), draw(ids)))
        value = dumps(message)
        if kind == "duplicate_keys":  # the valid session's id first: the last one counts
            value = value.replace(b"{", b'{"session_id": ' + dumps(sid) + b", ", 1)
        return Hostile(kind, "foreign", own.encode(), value)
    assert kind == "resent_id", kind
    i = draw(st.integers(0, len(valid) - 1))
    return Hostile(kind, "copy", *resent(valid[i], n), copies=i)


MALFORMED = ("not_json", "truncated", "not_an_object", "wrong_type", "bad_id", "missing_field",
             "unknown_type", "unknown_field", "schema_version", "huge_text", "huge_message",
             "deep", "invalid_utf8", "lone_surrogate", "bad_time", "wrong_key", "no_key",
             "bogus_kafka_timestamp", "tick", "empty")
WELL_FORMED = ("unknown_request", "duplicate_keys", "resent_id")
KINDS = MALFORMED + WELL_FORMED


@dataclass
class Scenario:
    seed: int
    privacy: str
    hostile: list[tuple[int, Hostile]]  # (insert before this valid message, message)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """A valid stream with one hostile message of every kind and a few more, inserted anywhere
    (a re-sent id after the message it copies)."""
    seed = draw(st.sampled_from(SEEDS))
    valid = valid_messages(seed)
    serial = count()
    kinds = list(KINDS) + draw(st.lists(st.sampled_from(KINDS), max_size=10))
    hostile = []
    for kind in kinds:
        h = draw(hostile_message(kind, valid, serial))
        hostile.append((draw(st.integers(h.copies + 1, len(valid))), h))
    return Scenario(seed, draw(st.sampled_from(sorted(PRIVACY))), hostile)


def mixed_records(scenario: Scenario):
    """The valid and hostile messages in one stream: records, and per record the hostile
    message (None for a valid one) and the valid message's index (None for a hostile one)."""
    valid = valid_messages(scenario.seed)
    before: dict[int, list[Hostile]] = {}
    for position, h in scenario.hostile:
        before.setdefault(position, []).append(h)
    offsets = [0] * PARTITIONS
    records, origin = [], []
    for i in range(len(valid) + 1):
        for h in before.get(i, []):
            p = h.partition if h.key is None else kafka_partition(h.key, PARTITIONS)
            records.append((p, offsets[p], h.key, h.value, h.timestamp_ms))
            origin.append((h, None))
            offsets[p] += 1
        if i < len(valid):
            key, value = valid[i]
            p = kafka_partition(key, PARTITIONS)
            records.append((p, offsets[p], key, value, ARRIVAL_MS))
            origin.append((None, i))
            offsets[p] += 1
    return records, origin


@functools.cache
def reference_rows(seed: int, privacy: str, root: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows of the valid messages alone, with the index of each late event's message."""
    config = fuzz_settings(root / f"reference-{seed}-{privacy}", privacy)
    records = kafka_records(valid_messages(seed), PARTITIONS, ARRIVAL_MS)
    side = run_replay(config, records)
    assert all(m.topic != config.dead_letter_topic for m in side)
    data_dir = config.data_dir
    at = {(p, offset): i for i, (p, offset, *_) in enumerate(records)}
    return outputs(data_dir, at)


def outputs(data_dir: Path, valid_at: dict[tuple[int, int], int]) -> dict[str, Any]:
    """Rows to compare: output tables whole (sorted by id), sessions without their duplicate
    counts (a re-sent id is one more duplicate: their sum is apart), late events of valid
    messages by their index."""
    got: dict[str, Any] = {}
    for table in OUTPUT_TABLES:
        id_col = TABLES[table][1]
        got[table] = sorted((r for r in rows(data_dir, table)
                             if not r["session_id"].startswith(FOREIGN)), key=lambda r: r[id_col])
    sessions = [r for r in rows(data_dir, "sessions") if not r["session_id"].startswith(FOREIGN)]
    got["sessions"] = sorted(({k: v for k, v in r.items() if k != "n_duplicates"}
                              for r in sessions), key=lambda r: r["session_key"])
    got["n_duplicates"] = sum(r["n_duplicates"] for r in sessions)
    late = []
    for r in rows(data_dir, "late_events"):
        index = valid_at.get((r["kafka_partition"], r["offset"]))
        if index is not None:
            late.append({"message": index, **{k: v for k, v in r.items()
                                              if k not in ("late_id", "offset")}})
    got["late_events"] = sorted(late, key=lambda r: r["message"])
    return got


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_runs = count()


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_hostile_messages_are_dead_letters_and_change_no_valid_output(workdir, scenario):
    records, origin = mixed_records(scenario)
    config = fuzz_settings(workdir / f"mixed-{next(_runs)}", scenario.privacy)
    data_dir, topic = config.data_dir, config.events_topic
    side = run_replay(config, records)  # handle() never raises: an exception fails here

    coords = [f"{topic}[{p}]@{offset}" for p, offset, *_ in records]
    malformed = {c: h for c, (h, _) in zip(coords, origin, strict=True)
                 if h is not None and h.expect == "dead"}
    dead_rows = {r["dead_letter_id"]: r for r in rows(data_dir, "dead_letters")}
    assert dead_rows.keys() == malformed.keys(), {c: h.kind for c, h in malformed.items()
                                                  if c not in dead_rows}
    for c, row in dead_rows.items():
        reason = row["reason"]
        assert reason and not reason.startswith("internal error"), (malformed[c].kind, reason)
        assert len(reason) <= MAX_REASON_CHARS
    dlq = Counter(json.loads(m.value)["source"] for m in side
                  if m.topic == config.dead_letter_topic)
    assert dlq == Counter(malformed.keys())  # one dead-letter topic message each

    valid_at = {(p, offset): i for (p, offset, *_), (_, i) in zip(records, origin, strict=True)
                if i is not None}
    got = outputs(data_dir, valid_at)
    want = reference_rows(scenario.seed, scenario.privacy, workdir)
    for table in (*OUTPUT_TABLES, "sessions", "late_events"):
        assert got[table] == want[table], table
    assert want["pairs"], "the valid traffic must yield pairs for the comparison to mean much"

    # the well-formed ones are all accounted for, never silently dropped
    copies = {(p, offset) for (p, offset, *_), (h, _) in zip(records, origin, strict=True)
              if h is not None and h.expect == "copy"}
    late = rows(data_dir, "late_events")
    late_copies = sum(1 for r in late if (r["kafka_partition"], r["offset"]) in copies)
    assert got["n_duplicates"] - want["n_duplicates"] + late_copies == len(copies)
    n_foreign = sum(1 for h, _ in origin if h is not None and h.expect == "foreign")
    foreign_sessions = [r for r in rows(data_dir, "sessions")
                        if r["session_id"].startswith(FOREIGN)]
    foreign_late = [r for r in late if r["session_id"].startswith(FOREIGN)]
    assert sum(r["n_events"] + r["n_duplicates"] for r in foreign_sessions) + len(
        foreign_late) == n_foreign
    shutil.rmtree(data_dir)


# --- end to end ------------------------------------------------------------------------------

def e2e_hostile(sid: str) -> list[tuple[str, bytes | None, bytes, int | None]]:
    """One fixed message of each malformed kind: ``(kind, key, value, timestamp_ms)``."""
    key = sid.encode()
    base = template("impression", event_id="h-e2e", session_id=sid, ts=E2E_END)
    copy = template("copy", event_id="h-e2e-copy", session_id=sid, ts=E2E_END)
    far = (datetime.now(timezone.utc) + timedelta(days=3)).isoformat()
    return [
        ("not_json", key, b"\x00\xff{{not json", None),
        ("truncated", key, dumps(base)[:40], None),
        ("not_an_object", key, b"[1, 2, {}]", None),
        ("wrong_type", key, dumps({**base, "position": "top"}), None),
        ("bad_id", key, dumps({**base, "event_id": "has spaces"}), None),
        ("missing_field", key, dumps({k: v for k, v in base.items() if k != "event_id"}), None),
        ("unknown_type", key, dumps({**base, "type": "like"}), None),
        ("unknown_field", key, dumps({**base, "sentiment": "angry"}), None),
        ("schema_version", key, dumps({**base, "schema_version": True}), None),
        ("huge_text", key, dumps({**base, "prompt": "語" * (MAX_TEXT_CHARS + 1)}), None),
        ("huge_message", key, b"{" + b" " * MAX_BYTES + dumps(base)[1:], None),
        ("deep", key, nested(50_000, "[]").encode(), None),
        ("deep_field", key, spliced(base, "prompt", nested(5_000, "{}").encode()), None),
        ("invalid_utf8", key, spliced(base, "response_text", b'"a\xed\xa0\x80b"'), None),
        ("lone_surrogate", key, spliced(base, "prompt", b'"\\ud800"'), None),
        ("naive_time", key, dumps({**base, "ts": "2026-11-20T09:00:00"}), None),
        ("future_time", key, dumps({**base, "ts": far}), None),
        ("wrong_key", b"someone-else", dumps(copy), None),
        ("no_key", None, dumps(copy), None),
        ("kafka_timestamp_year_9000", key, dumps(copy), MAX_WALL_MS),
        ("kafka_timestamp_beyond_datetime", key, dumps(copy), 2**62),
        ("kafka_timestamp_negative", key, dumps(copy), -5),
        ("tick", key, b'{"type":"_tick","wall_ms":-1}', None),
        ("empty", key, b"", None),
    ]


def test_a_worker_dead_letters_a_hostile_mix_and_pairs_the_rest(broker, tmp_path):
    config = make_settings(broker, tmp_path / "data", "fuzz")
    prepare(config)
    traffic = generate_traffic(TrafficConfig(n_events=400, seed=9, end=E2E_END, bad_share=0.0))
    valid = traffic.messages
    hostile = e2e_hostile(valid[0][0].decode())
    step = len(valid) // (len(hostile) + 1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 << 20,
                             max_in_flight_requests_per_connection=1)
    sent = []  # (hostile kind or None, future); a hostile message before every step-th one
    for i, (key, value) in enumerate(valid):
        if i % step == step - 1 and i // step < len(hostile):
            kind, h_key, h_value, ts_ms = hostile[i // step]
            sent.append((kind, producer.send(config.events_topic, key=h_key, value=h_value,
                                              timestamp_ms=ts_ms)))
        sent.append((None, producer.send(config.events_topic, key=key, value=value)))
    producer.flush()
    producer.close()
    coords = {}
    for kind, future in sent:
        if kind is not None:
            meta = future.get(timeout=10)
            coords[f"{config.events_topic}[{meta.partition}]@{meta.offset}"] = kind
    assert sorted(coords.values()) == sorted(h[0] for h in hostile)

    log_path = tmp_path / "worker.log"
    worker = start_worker(config, log_path)
    try:
        wait_until_drained(config, end_offsets(config), worker, timeout_s=90)
        time.sleep(1.0)  # a tick or two more: the worker must still be running
        assert worker.poll() is None, log_path.read_text()[-3000:]
    finally:
        stop(worker)
    assert "internal error" not in log_path.read_text()

    dlq = [json.loads(v) for v in read_topic(broker, config.dead_letter_topic)]
    assert Counter(d["source"] for d in dlq) == Counter(coords.keys()), coords
    assert all(d["reason"] for d in dlq)
    dead = dict(query(config.data_dir, "SELECT dead_letter_id, reason FROM dead_letters"))
    assert dead.keys() == coords.keys()
    assert all(reason and not reason.startswith("internal error") for reason in dead.values())
    for c, kind in coords.items():  # the broker keeps a producer's timestamps as they are
        assert kind.startswith("kafka_timestamp") == ("Kafka record timestamp" in dead[c]), kind

    reference(config, valid, tmp_path / "ref")
    for table in (*OUTPUT_TABLES, "sessions"):
        sql = f"SELECT * FROM {table} ORDER BY {TABLES[table][1]}"
        assert query(config.data_dir, sql) == query(tmp_path / "ref", sql), table
    assert query(tmp_path / "ref", "SELECT count(*) FROM pairs")[0][0] > 20


# --- a flood of sessions ---------------------------------------------------------------------

def test_a_flood_of_sessions_is_evicted_counted_and_logged_once_per_flush(tmp_path, caplog):
    """One-event sessions (a buggy or hostile producer minting session ids) stay within
    ``max_open_sessions`` per Kafka partition: the oldest are closed early and still yield
    their rows, a counter says how many, and each flush logs one warning, not one per session."""
    config = Settings(data_dir=tmp_path / "data", partitions=1, metrics_port=0,
                      max_open_sessions=3)
    init_data_dir(config.data_dir)
    pipeline = Pipeline(config, MemoryStore())
    for i in range(10):
        value = event("copy", minute=i / 10, session_id=f"flood-{i}").model_dump_json().encode()
        assert pipeline.handle(topic=config.events_topic, partition=0, offset=i,
                               key=f"flood-{i}".encode(), value=value,
                               timestamp_ms=ARRIVAL_MS) == []
        assert pipeline.state(0).open_sessions <= 3
    with caplog.at_level(logging.WARNING, logger="prefstream.streams.worker.pipeline"):
        batch = flush_offline(pipeline)
    warnings = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("7 open sessions closed early")
    assert batch.counts["evicted"] == 7
    assert pipeline.metrics.value("prefstream_sessions_evicted_total", partition="0") == 7
    sessions = rows(config.data_dir, "sessions")
    assert sorted(r["session_id"] for r in sessions if r["close_reason"] == "evicted") == [
        f"flood-{i}" for i in range(7)]
    # pairing ran on each evicted session: a copy of an answer never shown is refused
    assert [r["reason"] for r in rows(config.data_dir, "refusals")] == ["not_exposed"] * 7
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefstream.streams.worker.pipeline"):
        flush_offline(pipeline)  # nothing evicted since: no warning, the counter stays
    assert not [r for r in caplog.records if "evicted" in r.getMessage()]
    assert pipeline.metrics.value("prefstream_sessions_evicted_total", partition="0") == 7


def test_dead_letters_are_summed_up_in_one_warning_per_flush(tmp_path, caplog):
    """A flood of bad messages gives one warning per flush naming the first, not one each."""
    config = Settings(data_dir=tmp_path / "data", partitions=1, metrics_port=0)
    init_data_dir(config.data_dir)
    pipeline = Pipeline(config, MemoryStore())
    with caplog.at_level(logging.WARNING, logger="prefstream.streams.worker.pipeline"):
        for i in range(3):
            assert len(pipeline.handle(topic=config.events_topic, partition=0, offset=i,
                                       key=b"k", value=b"{not json", timestamp_ms=ARRIVAL_MS)) == 1
        assert not caplog.records
        flush_offline(pipeline)
        flush_offline(pipeline)  # nothing set aside since: no warning
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith("3 messages set aside as dead letters since the last flush")
    assert f"the first: {config.events_topic}[0]@0: " in warnings[0]
    assert len(rows(config.data_dir, "dead_letters")) == 3
