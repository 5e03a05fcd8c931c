"""Per Kafka partition: its watermark, the offset applied and the sessions still open
(``watermarks/p<N>.json``), what sealing waits for."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Watermark:
    kafka_partition: int
    watermark: datetime
    applied_offset: int
    #: sessions whose rows are still to come: open ones and groups the event cap holds
    open_sessions: int

def write_watermark(*, data_dir: Path, mark: Watermark) -> None:
    path = data_dir / "watermarks" / f"p{mark.kafka_partition}.json"
    tmp = path.with_suffix(".tmp")
    payload = {
        "kafka_partition": mark.kafka_partition,
        "watermark": mark.watermark.isoformat(),
        "applied_offset": mark.applied_offset,
        "open_sessions": mark.open_sessions,
    }
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)

def read_watermarks(data_dir: Path) -> dict[int, Watermark]:
    marks = {}
    for path in (data_dir / "watermarks").glob("p*.json"):
        raw = json.loads(path.read_text())
        raw["watermark"] = datetime.fromisoformat(raw["watermark"])
        marks[raw["kafka_partition"]] = Watermark(**raw)
    return marks
