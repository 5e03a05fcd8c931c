"""Every producer attack of docs/hostile-input.md at once, on the embedded broker, against one
worker process, while another client's canary sessions go on: the canaries keep their pairs, on
time, the funnel balances and the worker never restarts. Then a SIGTERM in the middle of its
flushes stops it cleanly and quietly."""

from __future__ import annotations

import json
import re
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from factories import event
from helpers.worker import make_settings, start_worker, wait_for
from kafka import KafkaProducer

from prefstream.schemas.events import MAX_TEXT_CHARS
from prefstream.sim.demo import funnel
from prefstream.storage.catalog import ensure_catalog
from prefstream.storage.files import read_table
from prefstream.storage.starts import STARTS_DIR
from prefstream.streams.broker import EmbeddedBroker
from prefstream.streams.worker.run import prepare

pytestmark = pytest.mark.broker

PARTITIONS = 2
CANARY_WAVES = 4
CANARIES_PER_WAVE = 6
CAP_FLOOD = 2010  # the session split by the event cap in one millisecond
GRACE_S, GAP_S = 3.0, 2.0  # short, so every session closes within the test
SKEW_S = 8  # a client clock ahead by more than the grace (within max_future_s)


def now() -> datetime:
    return datetime.now(timezone.utc)


class Client:
    """One producer client; counts what it sent (the funnel's events_produced)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5,
                                      max_request_size=4 << 20)
        self.topic = topic
        self.sent = 0

    def event(self, kind: str, ts: datetime, *, timestamp_ms: int | None = None,
              **fields: Any) -> None:
        ev = event(kind, **fields).model_copy(update={"ts": ts})
        self.raw(ev.session_id.encode(), ev.model_dump_json().encode(), timestamp_ms=timestamp_ms)

    def raw(self, key: bytes | None, value: bytes, *, partition: int | None = None,
            timestamp_ms: int | None = None) -> None:
        self.producer.send(self.topic, key=key, value=value, partition=partition,
                           timestamp_ms=timestamp_ms)
        self.sent += 1

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


def canary_wave(client: Client, wave: int) -> list[str]:
    """Sessions of two answers, thumbs up on one and down on the other, then an end: one thumbs
    pair each. Their events are a second old when sent."""
    ids = []
    for n in range(CANARIES_PER_WAVE):
        sid = f"canary-{wave}-{n}"
        t = now() - timedelta(seconds=1)
        common = dict(session_id=sid, user_id=f"cu{n}", request_id=f"{sid}-q")
        for pos, rid in enumerate("ab"):
            client.event("impression", t, event_id=f"{sid}-i{rid}", response_id=rid,
                         position=pos, response_text=f"answer {rid} of {sid}", **common)
        client.event("thumbs_up", t, event_id=f"{sid}-up", response_id="b", **common)
        client.event("thumbs_down", t, event_id=f"{sid}-down", response_id="a", **common)
        client.event("session_end", t, event_id=f"{sid}-end", **common)
        ids.append(sid)
    client.producer.flush()
    return ids


def attack_wave(client: Client, wave: int) -> None:
    """Forged ticks on every partition, a clock far ahead, a client clock ahead by more than
    the grace (main made every canary event late), signals naming another request; keyed to
    share the canaries' partitions."""
    far_ms = int(datetime(8999, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
    for p in range(PARTITIONS):
        client.raw(None, b'{"type":"_tick","wall_ms":%d}' % far_ms, partition=p)
        client.raw(None, json.dumps({"type": "_tick", "wall_ms": far_ms, "partition": p,
                                     "mac": "0" * 64}, separators=(",", ":")).encode(),
                   partition=p)
    far = datetime(2100, 1, 1, tzinfo=timezone.utc)
    skewed = now() + timedelta(seconds=SKEW_S)
    for n in range(4):
        sid = f"evil-clock-{wave}-{n}"
        client.event("copy", far, timestamp_ms=int(far.timestamp() * 1000), session_id=sid,
                     event_id=f"{sid}-far")
        client.event("copy", skewed, timestamp_ms=int(skewed.timestamp() * 1000),
                     session_id=sid, event_id=f"{sid}-skew")
    sid = f"evil-request-{wave}"
    t = now() - timedelta(seconds=1)
    for pos, rid in enumerate("ab"):
        client.event("impression", t, session_id=sid, event_id=f"{sid}-i{rid}", request_id="q1",
                     response_id=rid, position=pos, response_text=f"evil {rid}")
    client.event("thumbs_up", t, session_id=sid, event_id=f"{sid}-up", request_id="q2",
                 response_id="b")
    client.event("thumbs_down", t, session_id=sid, event_id=f"{sid}-down", request_id="q2",
                 response_id="a")
    client.producer.flush()


def poison(client: Client) -> None:
    """A session of 20 impressions of 66 kB, and one of 2,010 events in one millisecond."""
    t = now() - timedelta(seconds=1)
    text = "x" * MAX_TEXT_CHARS
    for n in range(20):
        client.event("impression", t, session_id="evil-bytes", event_id=f"big-{n}",
                     response_id=f"r{n}", prompt=text, response_text=text)
    for n in range(CAP_FLOOD):
        client.event("click", t, session_id="evil-count", event_id=f"c{n}", response_id="a")
    client.producer.flush()


def accounted(data_dir: Path) -> int:
    """Messages the stored rows account for so far."""
    n = sum(s["n_events"] + s["n_duplicates"]
            for s in read_table(data_dir=data_dir, table="sessions").to_pylist())
    return n + sum(read_table(data_dir=data_dir, table=t).num_rows
                   for t in ("dead_letters", "late_events"))


def stored_session_ids(data_dir: Path) -> set[str]:
    return {r["session_id"] for r in read_table(data_dir=data_dir, table="sessions").to_pylist()}


def test_every_producer_attack_at_once_leaves_the_canaries_and_the_worker_alone(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = make_settings(broker, tmp_path / "data", "hostile", grace_s=GRACE_S,
                             gap_s=GAP_S, flush_max_events=400)
    prepare(settings)
    log_path = tmp_path / "worker.log"
    worker = start_worker(settings, log_path)
    attacker = Client(broker.bootstrap, settings.events_topic)
    canary = Client(broker.bootstrap, settings.events_topic)
    canaries: list[str] = []
    try:
        # a session to be stored, then replayed with its ids and fresh times
        t0 = now() - timedelta(seconds=1)
        for n in range(3):
            attacker.event("copy", t0, session_id="evil-reuse", event_id=f"reuse-{n}")
        attacker.event("session_end", t0, session_id="evil-reuse", event_id="reuse-end")
        attacker.producer.flush()
        canaries += canary_wave(canary, 0)
        wait_for(lambda: "evil-reuse" in stored_session_ids(settings.data_dir),
                 "the session to re-use", 60, [worker])
        poison(attacker)
        for wave in range(1, CANARY_WAVES):
            attack_wave(attacker, wave)
            for n in range(3):
                attacker.event("copy", now(), session_id="evil-reuse", event_id=f"reuse-{n}")
            canaries += canary_wave(canary, wave)
            time.sleep(0.5)
        last_canary = time.monotonic()
        attacker.close()
        canary.close()

        def canaries_paired() -> bool:
            pairs = read_table(data_dir=settings.data_dir, table="pairs").to_pylist()
            return {p["session_id"] for p in pairs} >= set(canaries)

        wait_for(canaries_paired, "every canary pair", 30, [worker])
        on_time_s = time.monotonic() - last_canary
        produced = attacker.sent + canary.sent
        wait_for(lambda: accounted(settings.data_dir) == produced, "every session stored",
                 40, [worker])
        assert worker.poll() is None
        worker.send_signal(signal.SIGTERM)  # mid-flush: ticks keep its flushes going
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    data_dir = settings.data_dir
    pairs = read_table(data_dir=data_dir, table="pairs").to_pylist()
    canary_pairs = [p for p in pairs if p["session_id"].startswith("canary-")]
    assert len(canary_pairs) == len(canaries) == CANARY_WAVES * CANARIES_PER_WAVE
    assert all(p["rule"] == "thumbs" and p["chosen"].startswith("answer b")
               for p in canary_pairs)
    assert on_time_s < 30
    late = read_table(data_dir=data_dir, table="late_events").to_pylist()
    dead = read_table(data_dir=data_dir, table="dead_letters").to_pylist()
    assert not [r for r in late + dead if "canary-" in r["raw"]]

    ensure_catalog(data_dir)
    counts = funnel(data_dir)  # as the demo reads it back, through the DuckDB views
    assert produced == (counts["events_accepted"] + counts["duplicates_ignored"]
                        + counts["dead_lettered"] + counts["late"])  # the funnel balances

    reasons = [d["reason"] for d in dead]
    n_ticks = sum(r.startswith("tick:") or "'_tick'" in r for r in reasons)
    assert n_ticks == (CANARY_WAVES - 1) * PARTITIONS * 2
    assert sum(r.startswith("ts:") for r in reasons) == (CANARY_WAVES - 1) * 4  # year 2100
    assert sum("was stored already" in r for r in reasons) == (CANARY_WAVES - 1) * 3
    sessions = read_table(data_dir=data_dir, table="sessions").to_pylist()
    by_id: dict[str, list[dict[str, Any]]] = {}
    for s in sessions:
        by_id.setdefault(s["session_id"], []).append(s)
    refused = {sid: sum(f"session {sid} would exceed" in r for r in reasons)
               for sid in ("evil-bytes", "evil-count")}
    assert sum(s["n_events"] for s in by_id["evil-bytes"]) + refused["evil-bytes"] == 20
    assert sum(s["n_events"] for s in by_id["evil-count"]) + refused["evil-count"] == CAP_FLOOD
    assert any(s["close_reason"] == "max_bytes" for s in by_id["evil-bytes"])
    assert not [p for p in pairs if p["session_id"].startswith("evil-request")]
    refusals = read_table(data_dir=data_dir, table="refusals").to_pylist()
    assert sum(r["reason"] == "request_mismatch" for r in refusals) == (CANARY_WAVES - 1) * 2

    text = log_path.read_text(errors="replace")
    restarts = len(re.findall(r"Crashed|Restarting|recovered \d+ session slots", text)) - \
        PARTITIONS  # each partition's state is loaded once, at the start
    starts = [json.loads(p.read_text())["count"] for p in (data_dir / STARTS_DIR).glob("*.json")]
    assert restarts == 0 and starts == [1] * PARTITIONS
    for quiet in ("CRITICAL", "Traceback", "flush failed"):
        assert quiet not in text
    print(f"{produced} messages ({attacker.sent} hostile), {len(canary_pairs)} canary pairs "
          f"stored {on_time_s:.1f} s after the last canary, dead letters: {n_ticks} forged "
          f"ticks, {refused} oversized, {len(dead)} in all; restarts {restarts}")
