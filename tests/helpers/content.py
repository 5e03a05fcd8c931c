"""Preference files for the traffic generator's external content (``prefstream.sim.content``):
literal rows in the plain prompt/chosen/rejected format and an HH-RLHF style file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from prefstream.sim.traffic import TOPICS

#: literal prompt/chosen/rejected rows, each a valid pair
PLAIN_ROWS = [
    {"prompt": f"How do I {task}?", "chosen": good, "rejected": wrong}
    for task, good, wrong in TOPICS[:20]
]


def hh_row(prompt_turns: list[str], chosen: str, rejected: str) -> dict[str, str]:
    """An HH-RLHF style row: two whole dialogues that differ in the final assistant turn."""
    prefix = "".join(f"\n\n{turn}" for turn in prompt_turns) + "\n\nAssistant:"
    return {"chosen": f"{prefix} {chosen}", "rejected": f"{prefix} {rejected}"}


def write_hh_source(path: Path) -> dict[str, int]:
    """A gzipped HH-format file (30 good rows, one multi-turn); returns its skipped counts."""
    rows = [hh_row([f"Human: How can I {task}?"], good, wrong) for task, good, wrong in TOPICS]
    rows.append(hh_row(["Human: I need help with git.", "Assistant: Sure, what is it?",
                        "Human: How do I see the log?"], "Run `git log --oneline`.",
                       "Git has no history."))
    rows.append({"chosen": "\n\nHuman: hi\n\nAssistant: hello",  # differs before the last turn
                 "rejected": "\n\nHuman: yo\n\nAssistant: hey"})
    rows.append({"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected":
                 "\n\nHuman: hi\n\nAssistant: same"})  # identical dialogues
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return {"dialogue_mismatch": 2}
