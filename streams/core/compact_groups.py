"""Event time of an open session held compactly (:mod:`~prefstream.streams.core.compact`): its
bounds, its groups (:func:`sessionize.clusters`) and their deadlines, read from the encoded
events' headers (:data:`~prefstream.streams.core.compact_events.HEAD`) alone, in µs since the
epoch (the sessionizer's ``TICK``), without decoding an event.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from prefstream.schemas.records import CloseReason
from prefstream.schemas.rules import SessionRules
from prefstream.streams.core.compact_events import END, HEAD, TIME, ZONED
from prefstream.streams.core.sessionize import EPOCH, TICK, _deadline_of

#: (flags, µs, Kafka offset, size) of an event: its header
Head = tuple[int, int, int, int]
_limits: tuple[SessionRules | None, int, int] = (None, 0, 0)


def limits(rules: SessionRules) -> tuple[int, int]:
    """The gap and the longest duration of ``rules`` in µs (worked out once per rules: this
    runs for every event)."""
    global _limits
    if _limits[0] is not rules:
        _limits = (rules, rules.gap // TICK, rules.max_duration // TICK)
    return _limits[1], _limits[2]


def headers(blobs: tuple[bytes, ...]) -> list[Head]:
    return [HEAD.unpack_from(b) for b in blobs]


def bounds(heads: list[Head]) -> tuple[int, int, int | None]:
    """Which events give the session's start, last and end (``session_end``) times: the first
    in arrival order at the earliest, latest and latest end time (``min``/``max`` keep the
    first of equals, and the sessionizer takes them in arrival order)."""
    start = last = 0
    end = None
    lo = hi = heads[0][1]
    top = None
    for k, (flags, at, _, _) in enumerate(heads):
        if at < lo:
            start, lo = k, at
        if at > hi:
            last, hi = k, at
        if flags & ~ZONED == END and (top is None or at > top):
            end, top = k, at
    return start, last, end


def groups(heads: list[Head], rules: SessionRules) -> list[list[int]]:
    """The events (their places in arrival order) of each group of :func:`sessionize.clusters`:
    in order of time and Kafka offset, a new group after a gap or at the longest duration."""
    gap, longest = limits(rules)
    keys = [h[1:3] for h in heads]
    order = sorted(range(len(heads)), key=keys.__getitem__)
    out = [[order[0]]]
    start = last = heads[order[0]][1]
    for k in order[1:]:
        at = heads[k][1]
        if at - last >= gap or at - start >= longest:  # sessionize.splits
            out.append([])
            start = at
        out[-1].append(k)
        last = at
    return [sorted(g) for g in out] if len(out) > 1 else [list(range(len(heads)))]


def group_deadline(start: int, last: int, ended: int | None,
                   rules: SessionRules) -> tuple[int, CloseReason]:
    """:func:`sessionize._deadline_of` of a group from its start, last and end time (None: no
    ``session_end``): ``min`` of the same candidates (on equal times the reason's name decides,
    as it does there)."""
    gap, longest = limits(rules)
    candidates: list[tuple[int, CloseReason]] = [
        (last + gap, "gap"), (max(start + longest, last + 1), "max_duration")]
    if ended is not None:
        candidates.append((max(ended, last + 1), "session_end"))
    return min(candidates)


def deadline(blobs: tuple[bytes, ...], rules: SessionRules) -> tuple[datetime, CloseReason]:
    """:func:`sessionize.deadline` of the open session of these events."""
    start, last, ended = _first_group(blobs, rules)
    return _deadline_of(_at(start), _at(last), None if ended is None else _at(ended), rules)


def deadline_micros(blobs: tuple[bytes, ...], rules: SessionRules) -> int:
    """The time of :func:`deadline`, in integers alone: the partition schedules one for every
    accepted event, and needs no datetime for it."""
    if len(blobs) == 1:  # a session's first event
        flags, at = HEAD.unpack_from(blobs[0])[:2]
        return _due(at, at, at if flags & ~ZONED == END else None, rules)
    return _due(*_first_group(blobs, rules), rules)


def _due(start: int, last: int, ended: int | None, rules: SessionRules) -> int:
    """The time of :func:`group_deadline`."""
    gap, longest = limits(rules)
    after_last = last + 1
    due = min(last + gap, max(start + longest, after_last))
    return due if ended is None else min(due, max(ended, after_last))


def appended_deadline(blobs: tuple[bytes, ...], rules: SessionRules, before: tuple[bytes, ...],
                      due: int | None) -> int:
    """:func:`deadline_micros` of ``blobs``, the events ``before`` and one more (the last);
    from ``due``, the deadline of ``before`` (None: not known), when that event is the latest,
    reading each event's time once instead of sorting them.

    ``before`` (earliest time ``s``, latest ``L``, deadline ``D`` of its first group) is one
    group without a ``session_end`` whenever ``D > L + 1``: a later group starts at ``L`` or
    before, and ``D`` is at most that start (a gap after the first group's last event, or at
    ``s`` plus the longest duration); a ``session_end`` in a lone group makes ``D`` ``L + 1``.
    An event at ``t >= L`` then starts the next group (``D`` stays) or extends this one to ``t``.
    """
    if not before or due is None:
        return deadline_micros(blobs, rules)
    flags, t = HEAD.unpack_from(blobs[-1])[:2]
    times = list(map(TIME.unpack_from, before))
    (start,), (last,) = min(times), max(times)
    if t < last or due <= last + 1:
        return deadline_micros(blobs, rules)
    gap, longest = limits(rules)
    if t - last >= gap or t - start >= longest:
        return due  # sessionize.splits: the first group stays as it was
    return _due(start, t, t if flags & ~ZONED == END else None, rules)


def _first_group(blobs: tuple[bytes, ...], rules: SessionRules) -> tuple[int, int, int | None]:
    """Start, last and end (``session_end``, None: none) time of the first group."""
    times = sorted(HEAD.unpack_from(b)[1::-1] for b in blobs)
    gap, longest = limits(rules)
    start = last = times[0][0]
    ended = None
    for at, flags in times:
        if at - last >= gap or at - start >= longest:  # sessionize.splits
            break
        last = at
        if flags & ~ZONED == END:
            ended = at
    return start, last, ended


def _at(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)
