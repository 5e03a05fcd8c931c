"""The stored-id index's lookups around the latest expiry it holds (``storage/ids.py``)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from prefstream.storage.ids import StoredIds

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
