"""Where each Kafka partition was last taken over, kept across restarts: a worker that keeps
starting at the same offset is stuck (each start dies before its first commit) and says so.

One small file per partition, ``<data-dir>/starts/p<N>.json``: the offset the last takeover read
from and how many takeovers in a row read from it. Any worker of the data dir updates it when it
starts reading the partition.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

STARTS_DIR = "starts"
#: takeovers in a row at one offset from which the worker reports being stuck
STUCK_AFTER = 3


class StartLog:
    def __init__(self, data_dir: Path, stuck_after: int = STUCK_AFTER) -> None:
        self.folder = data_dir / STARTS_DIR
        self.stuck_after = stuck_after

    def started(self, partition: int, offset: int) -> int:
        """Record a takeover of ``partition`` reading from ``offset``; returns how many
        takeovers in a row read from it (an error is logged from ``stuck_after`` on)."""
        path = self.folder / f"p{partition}.json"
        last = self._read(path)
        count = last[1] + 1 if last is not None and last[0] == offset else 1
        self._write(path, offset, count)
        if count >= self.stuck_after:
            log.error("partition %d: start %d in a row at offset %d; every start since stopped "
                      "before committing past it. The log before each start says why (a "
                      "record or the state it builds that cannot be written?); "
                      "prefstream_starts_at_same_offset counts them", partition, count, offset)
        return count

    @staticmethod
    def _read(path: Path) -> tuple[int, int] | None:
        try:
            raw = json.loads(path.read_text())
            return int(raw["offset"]), int(raw["count"])
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: start over
            return None

    def _write(self, path: Path, offset: int, count: int) -> None:
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            self.folder.chmod(0o700)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # owner-only
            with open(fd, "w") as fh:
                fh.write(json.dumps({"offset": offset, "count": count}))
            os.replace(tmp, path)
        except OSError as exc:  # a note for the operator: never a reason to stop
            log.warning("cannot record the start of %s: %s", path.name, exc)
