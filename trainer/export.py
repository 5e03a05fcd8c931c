"""Export sealed pairs for other trainers: TRL preference JSONL and KTO JSONL.

- preference (DPO, RewardTrainer): ``{"prompt", "chosen", "rejected"}`` per line, plus
  ``"margin"`` (``margin_coef * max(confidence - 0.5, 0)``) when a margin coefficient is given;
- KTO: ``{"prompt", "completion", "label"}`` per line from the ``unpaired`` table.

Only sealed partitions are exported (all of them by default), rows as stored, oldest first. The
file is written under a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from prefstream.storage.files import read_table, sealed_partitions
from prefstream.trainer import TrainerError
from prefstream.trainer.loss import pair_margin


def sealed_names(data_dir: Path, partitions: Sequence[str] | None = None) -> list[str]:
    """The requested partitions (default: every sealed one); ``TrainerError`` if one is not
    sealed."""
    sealed = [row.partition for row in sealed_partitions(data_dir)]
    if partitions is None:
        return sealed
    unsealed = sorted(set(partitions) - set(sealed))
    if unsealed:
        raise TrainerError(f"not sealed (or unknown): {', '.join(unsealed)}")
    return sorted(set(partitions))


def export_preferences(data_dir: Path, out: Path, *, partitions: Sequence[str] | None = None,
                       margin_coef: float | None = None) -> int:
    """Write TRL preference JSONL; returns the number of lines."""
    rows = _rows(data_dir, "pairs", sealed_names(data_dir, partitions))
    lines = []
    for r in rows:
        line: dict[str, Any] = {"prompt": r["prompt"], "chosen": r["chosen"],
                                "rejected": r["rejected"]}
        if margin_coef is not None:
            line["margin"] = pair_margin(r["confidence"], margin_coef)
        lines.append(line)
    return _write_jsonl(out, lines)


def export_kto(data_dir: Path, out: Path, *, partitions: Sequence[str] | None = None) -> int:
    """Write KTO JSONL (prompt, completion, label) from unpaired rows; returns the line count."""
    rows = _rows(data_dir, "unpaired", sealed_names(data_dir, partitions))
    return _write_jsonl(out, ({"prompt": r["prompt"], "completion": r["completion"],
                               "label": bool(r["label"])} for r in rows))


def _rows(data_dir: Path, table: str, partitions: list[str]) -> list[dict[str, Any]]:
    if not partitions:
        return []
    rows = read_table(data_dir=data_dir, table=table, partitions=partitions).to_pylist()
    return sorted(rows, key=lambda r: (r["partition"], r["event_time"]))


def _write_jsonl(out: Path, lines: Iterable[dict[str, Any]]) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    n = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # owner-only: user texts
        with open(fd, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n
