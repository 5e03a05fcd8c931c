"""Event ids of stored sessions, so an id re-used after its session was written is still a
duplicate within the dedupe horizon (see ``docs/hostile-input.md``).

While a session is in the worker's state its events' ids are found there. Once its rows are
written and it is forgotten, each event id (with its session id, as a 64-bit fingerprint) is
remembered here until the partition's watermark passes the session's last event plus
``dedupe_horizon_s``. A new event with a remembered id, read at another offset and not late, is
refused as a duplicate of a stored event. The same record read again after a restart (same
offset) is not: it replays what was stored, and row ids keep the rows single.

Persisted per Kafka partition under ``<data-dir>/dedupe/p<N>/``: one small ``.npy`` file per flush,
named by the latest expiry it holds (expired files are deleted by name), merged into one when
they grow many. A worker taking the partition over reads them, so stored ids count across
restarts and handovers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from prefstream.schemas.records import ClosedSession

log = logging.getLogger(__name__)

DEDUPE_DIR = "dedupe"
#: files of one partition beyond which they are merged into one at the next flush
MERGE_FILES = 64
#: entries added since the last merge into the sorted array beyond which they are merged (or an
#: eighth of the sorted ones, if more: a merge costs the whole array, so it stays amortized)
MERGE_ENTRIES = 4096
ENTRY = np.dtype([("fp", "<i8"), ("until", "<i8"), ("offset", "<i8")])


def fingerprint(session_id: str, event_id: str) -> int:
    """A stable 64-bit fingerprint of an event id within its session (the same in every
    process: Python's ``hash`` of a string is not)."""
    digest = hashlib.blake2b(f"{session_id}\x00{event_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def fingerprints(keys: Iterable[tuple[str, str]]) -> np.ndarray:
    """:func:`fingerprint` of many ``(session_id, event_id)``, as int64: the digests joined and
    read as one little-endian array (the same numbers, without a Python int per id)."""
    blake2b = hashlib.blake2b
    raw = b"".join([blake2b(f"{s}\x00{e}".encode(), digest_size=8).digest() for s, e in keys])
    return np.frombuffer(raw, dtype="<i8")


def _entries(fps: np.ndarray, until: int | list[int], offsets: list[int]) -> np.ndarray:
    """Entries from their columns (a structured array filled field by field: building it from a
    tuple per entry costs more than the fingerprints)."""
    out = np.empty(len(fps), dtype=ENTRY)
    out["fp"], out["until"], out["offset"] = fps, until, offsets
    return out


def _micros(ts: datetime) -> int:
    return int(ts.timestamp() * 1_000_000)


class StoredEvents:
    """The remembered event ids of one Kafka partition."""

    def __init__(self, folder: Path, horizon: timedelta) -> None:
        self.folder = folder
        self.horizon = horizon
        self._sorted = np.empty(0, dtype=ENTRY)  # by fingerprint
        self._recent: dict[int, tuple[int, int]] = {}  # fp -> (until µs, offset)
        # no entry expires later than this (µs; kept through merges): while the watermark is
        # past it, no id is stored within the horizon, and a lookup needs no fingerprint
        self.latest = -1
        files = self._files()
        if files:
            self._fold(np.concatenate([self._read(f) for f in files]), None)

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def stored_at(self, fp: int, watermark: datetime) -> int | None:
        """The offset of the stored event with this fingerprint, if within the horizon."""
        return self.stored_at_micros(fp, _micros(watermark))

    def stored_at_micros(self, fp: int, now: int) -> int | None:
        """:meth:`stored_at` with the watermark ``now`` in µs."""
        hit = self._recent.get(fp)
        if hit is None and len(self._sorted):
            at = int(np.searchsorted(self._sorted["fp"], fp))
            if at < len(self._sorted) and self._sorted["fp"][at] == fp:
                hit = int(self._sorted["until"][at]), int(self._sorted["offset"][at])
        if hit is None or hit[0] < now:
            return None
        return hit[1]

    def entries(self, events: list[tuple[str, str, int]], last: datetime) -> np.ndarray:
        """Entries for the events ``(session_id, event_id, offset)`` of a session whose last
        event is at ``last``."""
        return _entries(fingerprints((s, e) for s, e, _ in events),
                        _micros(last + self.horizon), [o for _, _, o in events])

    def write(self, entries: np.ndarray, watermark: datetime) -> None:
        """Persist entries of one flush (in the flush thread), drop expired files, and merge
        the files when they grow many. Memory is updated by :meth:`remember`."""
        if len(entries):
            self._write_file(entries)
        now = _micros(watermark)
        files = self._files()
        for f in files:
            if int(f.name.split("-", 1)[0]) < now:
                f.unlink(missing_ok=True)
        files = [f for f in files if f.exists()]
        if len(files) > MERGE_FILES:
            merged = np.concatenate([self._read(f) for f in files])
            self._write_file(merged[merged["until"] >= now])
            for f in files:
                f.unlink(missing_ok=True)

    def remember(self, entries: np.ndarray, watermark: datetime) -> None:
        """Add entries written by a flush (on the event loop, after it)."""
        self._add(entries, _micros(watermark))

    def _add(self, entries: np.ndarray, now: int | None = None) -> None:
        if len(entries):
            self.latest = max(self.latest, int(entries["until"].max()))
        for fp, until, offset in entries.tolist():
            old = self._recent.get(fp)
            if old is None or old[0] < until:
                self._recent[fp] = (until, offset)
        if len(self._recent) >= max(MERGE_ENTRIES, len(self._sorted) // 8):
            self._merge(now)

    def _merge(self, now: int | None) -> None:
        """Fold the recent entries into the sorted array."""
        recent = np.array([(fp, u, o) for fp, (u, o) in self._recent.items()], dtype=ENTRY)
        self._recent = {}
        self._fold(recent, now)

    def _fold(self, entries: np.ndarray, now: int | None) -> None:
        """Merge ``entries`` into the sorted array, dropping those expired at ``now``."""
        merged = np.concatenate([self._sorted, entries]) if len(self._sorted) else entries
        if now is not None:
            merged = merged[merged["until"] >= now]
        order = np.lexsort((-merged["until"], merged["fp"]))  # per fp, the latest expiry first
        merged = merged[order]
        keep = np.ones(len(merged), dtype=bool)
        keep[1:] = merged["fp"][1:] != merged["fp"][:-1]
        self._sorted = merged[keep]
        if len(self._sorted):
            self.latest = max(self.latest, int(self._sorted["until"].max()))

    def _files(self) -> list[Path]:
        try:
            return sorted(self.folder.glob("*.npy"))
        except OSError:
            return []

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        try:
            data = np.load(path, allow_pickle=False)
            if data.dtype == ENTRY:
                return data
        except (OSError, ValueError) as exc:
            log.warning("dedupe file %s unreadable, ignored: %s", path, exc)
        return np.empty(0, dtype=ENTRY)

    def _write_file(self, entries: np.ndarray) -> None:
        for folder in (self.folder.parent, self.folder):  # owner-only, as the data dir
            folder.mkdir(mode=0o700, exist_ok=True)
            folder.chmod(0o700)
        name = f"{int(entries['until'].max()):020d}-{uuid.uuid4().hex[:8]}.npy"
        tmp = self.folder / f".{name}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            np.save(fh, entries, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / name)


class StoredIds:
    """:class:`StoredEvents` of every Kafka partition a worker reads (the pipeline's view)."""

    def __init__(self, data_dir: Path, horizon: timedelta) -> None:
        self.root = data_dir / DEDUPE_DIR
        self.horizon = horizon
        self.partitions: dict[int, StoredEvents] = {}

    def load(self, kafka_partition: int) -> None:
        self.partitions[kafka_partition] = StoredEvents(self.root / f"p{kafka_partition}",
                                                        self.horizon)

    def drop(self, kafka_partition: int) -> None:
        self.partitions.pop(kafka_partition, None)

    def stored_at(self, kafka_partition: int, session_id: str, event_id: str,
                  watermark: datetime) -> int | None:
        part = self.partitions.get(kafka_partition)
        if part is None:
            return None
        now = _micros(watermark)
        if part.latest < now:  # nothing stored within the horizon: spare the fingerprint
            return None
        return part.stored_at_micros(fingerprint(session_id, event_id), now)

    def write(self, closed: list[ClosedSession],
              watermarks: dict[int, datetime]) -> dict[int, np.ndarray]:
        """Persist the event ids of the sessions a flush wrote (in the flush thread); returns
        them per Kafka partition for :meth:`remember`."""
        columns: dict[int, tuple[list[tuple[str, str]], list[int], list[int]]] = {}
        for c in closed:
            s = c.session
            part = self.partitions.get(s.kafka_partition)
            if part is not None:
                keys, untils, offsets = columns.setdefault(s.kafka_partition, ([], [], []))
                keys += [(s.session_id, i.event.event_id) for i in s.events]
                offsets += [i.offset for i in s.events]
                untils += [_micros(s.last + part.horizon)] * len(s.events)
        out = {}
        # a copy: the event loop loads a partition it starts reading while this thread writes
        for p, part in list(self.partitions.items()):
            keys, untils, offsets = columns.get(p, ([], [], []))
            entries = _entries(fingerprints(keys), untils, offsets)
            if p in watermarks:
                part.write(entries, watermarks[p])
            out[p] = entries
        return out

    def remember(self, written: dict[int, np.ndarray], watermarks: dict[int, datetime]) -> None:
        for p, entries in written.items():
            part = self.partitions.get(p)
            if part is not None and p in watermarks:
                part.remember(entries, watermarks[p])
