"""Every offset of every partition reaches the pipeline once per assignment, in order.

Faust drops messages silently around a rebalance, counting on its seek to the committed offsets
to deliver them again: its stream skips messages fetched in an older consumer generation or
while flow control is suspended, and its fetch loop drops offsets below the last one it read.
aiokafka leaves the position alone for a partition that was never committed, and a skipped
message there is an event lost for good. The guard tells the agent, message by message, whether
to handle it, to drop it (handled already, or read before a seek back took effect), or to read
its partition again from the first offset it has not handled.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

HANDLE = None  #: ``admit``'s answer for a message to handle
DROP = -1  #: ``admit``'s answer for a message to drop without a seek


@dataclass
class OffsetGuard:
    #: per partition, the next offset to handle (unknown until assigned or first seen)
    next: dict[Hashable, int] = field(default_factory=dict)
    #: per partition sought back, the offset the seek will deliver first
    target: dict[Hashable, int] = field(default_factory=dict)
    #: offsets found skipped and read again, per partition
    reread: dict[Hashable, int] = field(default_factory=dict)
    #: seconds to wait for a seek's first offset before seeking again (it can be dropped too)
    retry_s: float = 2.0
    sought_at: dict[Hashable, float] = field(default_factory=dict)

    def assign(self, starts: Mapping[Hashable, int], *, keep: bool = False) -> None:
        """A new assignment reads each partition from ``starts`` (its committed offset, or the
        earliest); partitions left out go on from wherever their first message is.
        ``keep``: only these partitions were sought; the others keep their place."""
        if not keep:
            self.next.clear()
            self.target.clear()
            self.sought_at.clear()
        for tp, offset in starts.items():
            self.next[tp] = offset
            self.target.pop(tp, None)
            self.sought_at.pop(tp, None)

    def admit(self, tp: Hashable, offset: int, now: float) -> int | None:
        """``HANDLE`` (None), ``DROP`` (-1), or the offset to seek ``tp`` back to (the message
        is dropped and the partition waits for that offset). ``now``: a monotonic clock.

        Messages fetched before a seek took effect are dropped until the offset sought
        arrives. Faust may drop that one as well (another rebalance's flow stop); a later
        message then comes instead, and after ``retry_s`` the guard asks for the seek again.
        """
        target = self.target.get(tp)
        if target is not None:
            if offset == target:
                del self.target[tp]
                self.next[tp] = offset + 1
                return HANDLE
            if offset > target and now - self.sought_at.get(tp, now) >= self.retry_s:
                self.sought_at[tp] = now
                return target
            return DROP  # fetched before the seek took effect
        want = self.next.get(tp)
        if want is not None and offset < want:
            return DROP  # handled already in this assignment
        if want is not None and offset > want:
            self.target[tp] = want
            self.sought_at[tp] = now
            self.reread[tp] = self.reread.get(tp, 0) + offset - want
            return want
        self.next[tp] = offset + 1
        return HANDLE

    def seeking(self, tp: Hashable, offset: int) -> None:
        """``tp`` was sought to ``offset`` instead (the log no longer holds the one asked)."""
        self.target[tp] = offset
        self.next[tp] = offset
