"""A session id's state as a partition holds it (``compact.StoredSlot``: an open session
compactly, anything else as the sessionizer's models), and what the partition
(:mod:`~prefstream.streams.core.state`) reads of it: its deadline and last event time in µs,
its open and held groups, and the slots as models."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime

from prefstream.streams.core import compact, compact_groups
from prefstream.streams.core.compact import OpenSlot, StoredSlot, to_model
from prefstream.streams.core.compact_events import micros_in_zone
from prefstream.streams.core.sessionize import Session, SessionRules, SessionSlot, next_deadline


def last_offset(session: Session) -> int:
    """The highest Kafka offset among a session's events and its duplicates' copies."""
    return max([i.offset for i in session.events] + [o for o, _ in session.duplicates])


def micros(ts: datetime) -> int:
    """A time as µs since the epoch: what the heaps hold (an int is smaller than a datetime)."""
    return micros_in_zone(ts)[0]


def open_last(slot: StoredSlot | None) -> int | None:
    """The last event time (µs) of the open session of ``slot`` (None: nothing open)."""
    if slot is None:
        return None
    if isinstance(slot, OpenSlot):
        return slot.last_micros()
    return micros(slot.open.last) if slot.open is not None else None


def has_open(slot: StoredSlot | None) -> bool:
    return isinstance(slot, OpenSlot) or (slot is not None and slot.open is not None)


def n_held(slot: StoredSlot | None) -> int:
    return 0 if slot is None or isinstance(slot, OpenSlot) else len(slot.held)


def next_deadline_micros(slot: StoredSlot, rules: SessionRules) -> int | None:
    """:func:`next_deadline` in µs."""
    if isinstance(slot, OpenSlot):
        return compact_groups.deadline_micros(slot.blobs(), rules)
    due = next_deadline(slot, rules)
    return None if due is None else micros(due)


def to_stored(session_id: str, slot: SessionSlot | StoredSlot) -> StoredSlot:
    return compact.compact(slot, session_id) if isinstance(slot, SessionSlot) else slot


def adopted(session_id: str, slot: StoredSlot) -> StoredSlot:
    """A loaded slot, held as :func:`to_stored`; an ``OpenSlot`` copied, as it notes its deadline
    (the store's own object may be loaded by another partition state too)."""
    if isinstance(slot, OpenSlot):
        return compact.copy(slot)
    return to_stored(session_id, slot)


class SlotView(Mapping[str, SessionSlot]):
    """The slots of a partition as the sessionizer's models (materialized on access)."""

    def __init__(self, slots: dict[str, StoredSlot]) -> None:
        self._slots = slots

    def __getitem__(self, session_id: str) -> SessionSlot:
        return to_model(self._slots[session_id])

    def __iter__(self) -> Iterator[str]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._slots
