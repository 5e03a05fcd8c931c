"""The stored-id index (``storage/ids.py``): lookups around the latest expiry it holds, and the
entries a flush writes (built column-wise, equal to one fingerprint at a time)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from factories import at, event
from hypothesis import given, settings
from hypothesis import strategies as st

from prefstream.schemas.records import ClosedSession, Session, SessionEvent
from prefstream.storage.ids import ENTRY, StoredIds, fingerprint, fingerprints

T = datetime(2026, 11, 20, 10, tzinfo=timezone.utc)
TICK = timedelta(microseconds=1)


def test_an_id_is_found_until_its_expiry_and_not_a_microsecond_after(tmp_path: Path) -> None:
    """The lookup skipped once the watermark passed every entry's expiry answers as the index
    does: found up to and at the expiry (last event + horizon), gone right after it."""
    ids = StoredIds(tmp_path, timedelta(hours=1))
    ids.load(0)
    assert ids.stored_at(0, "s", "e", T) is None  # nothing stored yet
    part = ids.partitions[0]
    part.remember(part.entries([("s", "e", 7)], T), T)
    part.remember(part.entries([("s", "f", 9)], T - timedelta(minutes=5)), T)
    expiry = T + timedelta(hours=1)
    assert ids.stored_at(0, "s", "e", expiry) == 7
    assert ids.stored_at(0, "s", "f", expiry) is None  # its own expiry passed, not the index's
    assert ids.stored_at(0, "s", "g", T) is None
    assert ids.stored_at(0, "s", "e", expiry + TICK) is None
    reloaded = StoredIds(tmp_path, timedelta(hours=1))
    reloaded.load(0)  # nothing written to files: a fresh index holds nothing
    assert reloaded.stored_at(0, "s", "e", T) is None
    reloaded.partitions[0].write(part.entries([("s", "e", 7)], T), T)
    reloaded.load(0)  # read back from its file
    assert reloaded.stored_at(0, "s", "e", expiry) == 7
    assert reloaded.stored_at(0, "s", "e", expiry + TICK) is None


def _reference_entries(events: list[tuple[str, str, int]], until: int) -> np.ndarray:
    """Entries as built before: a tuple per entry, one fingerprint at a time."""
    return np.array([(fingerprint(s, e), until, o) for s, e, o in events], dtype=ENTRY)


@settings(max_examples=60, deadline=None)
@given(events=st.lists(st.tuples(st.text(max_size=6), st.text(max_size=12),
                                 st.integers(0, 2**62)), max_size=8),
       minutes=st.integers(0, 10**6))
def test_entries_are_the_fingerprints_one_at_a_time(events, minutes) -> None:
    part = StoredIds(Path("/nonexistent"), timedelta(hours=1))
    part.load(0)
    last = T + timedelta(minutes=minutes)
    got = part.partitions[0].entries(events, last)
    want = _reference_entries(events, int((last + timedelta(hours=1)).timestamp() * 1e6))
    assert got.dtype == ENTRY and got.tolist() == want.tolist()
    assert fingerprints([(s, e) for s, e, _ in events]).tolist() == want["fp"].tolist()


def test_a_flush_writes_each_partitions_sessions_in_order(tmp_path: Path) -> None:
    def closed(kafka_partition: int, session_id: str, minute: int, *ids: str) -> ClosedSession:
        items = tuple(SessionEvent(offset=10 * minute + n, event=event(
            minute=minute, event_id=i, session_id=session_id)) for n, i in enumerate(ids))
        return ClosedSession(session=Session(
            session_id=session_id, user_id="u1", kafka_partition=kafka_partition,
            start=at(minute), last=at(minute), events=items), reason="gap")

    ids = StoredIds(tmp_path, timedelta(hours=1))
    for p in (0, 1, 3):
        ids.load(p)
    sessions = [closed(0, "a", 1, "e1", "e2"), closed(1, "b", 2, "e1"),
                closed(2, "c", 3, "x"), closed(0, "d", 4, "e3"), closed(1, "e", 5)]
    written = ids.write(sessions, {0: at(0), 1: at(0)})
    hour = timedelta(hours=1)
    micros = [int((at(m) + hour).timestamp() * 1e6) for m in range(6)]
    assert {p: e.tolist() for p, e in written.items()} == {
        0: [*_reference_entries([("a", "e1", 10), ("a", "e2", 11)], micros[1]).tolist(),
            *_reference_entries([("d", "e3", 40)], micros[4]).tolist()],
        1: _reference_entries([("b", "e1", 20)], micros[2]).tolist(),
        3: []}  # partition 2 is not this worker's; 3 had no session
    assert all(e.dtype == ENTRY for e in written.values())
    assert sorted(f.parent.name for f in (tmp_path / "dedupe").glob("p*/*.npy")) == ["p0", "p1"]
    ids.remember(written, {0: at(0), 1: at(0)})
    assert ids.stored_at(0, "d", "e3", at(30)) == 40 and ids.stored_at(1, "b", "e1", at(0)) == 20


def test_a_partition_loaded_while_a_flush_writes_its_ids_is_left_to_the_next(
        tmp_path: Path) -> None:
    """The flush thread writes while the event loop takes up a newly assigned partition
    (``Pipeline.state`` loads its ids): here partition 1 is loaded at the moment partition 0's
    ids are written. The flush writes what it holds and leaves the new partition alone; a
    RuntimeError (dictionary changed size during iteration) once stopped a worker there."""
    ids = StoredIds(tmp_path, timedelta(hours=1))
    ids.load(0)
    part = ids.partitions[0]
    write = part.write

    def write_while_loading(entries: np.ndarray, watermark: datetime) -> None:
        ids.load(1)  # as the event loop does, between two steps of this thread
        write(entries, watermark)

    part.write = write_while_loading  # type: ignore[method-assign]
    session = Session(session_id="a", user_id="u1", kafka_partition=0, start=at(1), last=at(1),
                      events=(SessionEvent(offset=5, event=event(minute=1, event_id="e1",
                                                                 session_id="a")),))
    written = ids.write([ClosedSession(session=session, reason="gap")], {0: at(0)})
    assert list(written) == [0] and written[0]["offset"].tolist() == [5]
    assert sorted(ids.partitions) == [0, 1]

