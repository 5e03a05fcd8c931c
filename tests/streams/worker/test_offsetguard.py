"""The offset guard: whatever Faust drops or delivers late around rebalances, the agent handles
each offset of a partition exactly once and in order."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefstream.streams.worker.offsetguard import DROP, HANDLE, OffsetGuard


def test_a_gap_is_read_again_and_messages_before_the_seek_are_dropped() -> None:
    guard = OffsetGuard()
    guard.assign({"p0": 5})
    assert guard.admit("p0", 5, 0.0) is HANDLE
    assert guard.admit("p0", 9, 0.0) == 6  # 6..8 never arrived: seek back to 6
    assert guard.admit("p0", 10, 0.0) == DROP  # still from the fetch before the seek
    assert guard.admit("p0", 6, 0.0) is HANDLE
    assert guard.admit("p0", 7, 0.0) is HANDLE
    assert guard.admit("p0", 7, 0.0) == DROP  # handled already
    assert guard.reread == {"p0": 3}


def test_an_assignment_resets_the_partitions_and_an_unknown_one_starts_where_it_is() -> None:
    guard = OffsetGuard()
    guard.assign({"p0": 0})
    assert guard.admit("p0", 3, 0.0) == 0
    guard.assign({"p1": 2})  # a rebalance: the pending seek of p0 is void, p0 unknown now
    assert guard.admit("p0", 3, 0.0) is HANDLE
    assert guard.admit("p1", 2, 0.0) is HANDLE
    guard.assign({"p0": 10}, keep=True)  # p0 sought alone: p1 keeps its place
    assert guard.admit("p1", 3, 0.0) is HANDLE
    assert guard.admit("p0", 4, 0.0) == DROP
    assert guard.admit("p0", 10, 0.0) is HANDLE


def test_a_seek_past_deleted_offsets_waits_for_the_earliest_one_left() -> None:
    guard = OffsetGuard()
    guard.assign({"p0": 0})
    assert guard.admit("p0", 50, 0.0) == 0
    guard.seeking("p0", 20)  # the log starts at 20 now
    assert guard.admit("p0", 51, 0.0) == DROP
    assert guard.admit("p0", 20, 0.0) is HANDLE


def test_a_seek_whose_first_offset_is_dropped_again_is_repeated_after_the_retry_time() -> None:
    guard = OffsetGuard(retry_s=2.0)
    guard.assign({"p0": 0})
    assert guard.admit("p0", 3, 10.0) == 0
    assert guard.admit("p0", 1, 11.0) == DROP  # the seek's 0 never came; 1 is not handled
    assert guard.admit("p0", 2, 12.5) == 0  # asked again once 2 s passed
    assert guard.admit("p0", 3, 13.0) == DROP
    assert guard.admit("p0", 0, 13.1) is HANDLE


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 60), start=st.integers(0, 5), data=st.data())
def test_every_offset_is_handled_once_in_order_whatever_is_dropped_or_late(
    n: int, start: int, data: st.DataObject
) -> None:
    """A fetcher that may silently skip a run of offsets (as Faust does around a rebalance),
    with a queue that still delivers messages fetched before a seek took effect. The log keeps
    growing (the worker's own watermark ticks), one offset per step."""
    guard = OffsetGuard(retry_s=3.0)
    guard.assign({"p": start})
    position = start
    queue: deque[int] = deque()
    handled: list[int] = []
    faults = 0
    now = 0.0
    while not handled or handled[-1] < start + n:
        now += 1.0
        assert now < 2000, f"stalled at {handled[-1:]}"
        if not queue or data.draw(st.booleans()):
            if faults < 10 and data.draw(st.integers(0, 4)) == 0:
                faults += 1  # a silent drop of the next few offsets
                position += data.draw(st.integers(1, 5))
            else:
                queue.append(position)
                position += 1
            continue
        offset = queue.popleft()
        verdict = guard.admit("p", offset, now)
        if verdict is HANDLE:
            handled.append(offset)
        elif verdict != DROP:  # the seek; messages fetched before it may still be queued
            queue = deque(list(queue)[:data.draw(st.integers(0, len(queue)))])
            position = verdict
    assert handled == list(range(start, start + len(handled)))
