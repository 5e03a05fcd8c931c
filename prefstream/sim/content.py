"""External content for the traffic generator: preference pairs read from a JSONL file.

A source file holds one JSON object a line (optionally gzipped): either ``prompt``/``chosen``/
``rejected`` or HH-RLHF style ``chosen``/``rejected`` dialogues that share everything up to the
final assistant turn (split with :func:`trainer.evaluate.split_dialogue_pair`). Rows that break
the pair contract (identical answers, dialogues that differ earlier, empty or oversized texts,
bad JSON) are skipped and counted by reason, never guessed.

A share of the valid rows is held out, grouped by prompt so that no held-out prompt is ever
simulated: those rows become explicit labels for the calibration audit. Everything but
:func:`read_source` and :func:`write_labels` is pure.
"""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefstream.schemas.events import MAX_TEXT_CHARS

#: room kept below the schema's text limit for a same-intent rephrasing of the prompt
REPHRASE_ROOM = 64
#: same-intent rewordings of a prompt: a few words around the original keep token overlap high
REPHRASINGS = ("{} Please answer again.", "In other words: {}", "Let me rephrase. {}",
               "{} Could you explain that differently?", "Again: {}")
SKIP_REASONS = ("not_json", "not_a_pair_object", "dialogue_mismatch", "empty_text",
                "identical_answers", "text_too_long")
ASSISTANT_TURN = "\n\nAssistant:"


@dataclass(frozen=True)
class SourcePair:
    """One labelled comparison: ``chosen`` is the better answer to ``prompt`` in truth."""

    prompt: str
    chosen: str
    rejected: str

    def as_label(self) -> dict[str, str]:
        """The explicit-label JSON object (TRL column names)."""
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass
class SourceRows:
    """What a source file held: the valid pairs in file order and the skipped rows by reason."""

    pairs: list[SourcePair] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def n_rows(self) -> int:
        return len(self.pairs) + sum(self.skipped.values())


def parse_row(line: str) -> SourcePair | str:
    """One source line as a pair, or the reason it is skipped (one of ``SKIP_REASONS``)."""
    try:
        row: Any = json.loads(line)
    except ValueError:
        return "not_json"
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str)
                                            for k in ("chosen", "rejected")):
        return "not_a_pair_object"
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            return "not_a_pair_object"
        triple: tuple[str, str, str] | None = (row["prompt"], row["chosen"].strip(),
                                               row["rejected"].strip())
    else:
        triple = _split_dialogue(row["chosen"], row["rejected"])
        if triple is None:
            return "dialogue_mismatch"
    return _check(SourcePair(*triple))


def _split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    # Imported here: the trainer package pulls in torch, which synthetic traffic never needs.
    from prefstream.trainer.evaluate import split_dialogue_pair

    return split_dialogue_pair(chosen, rejected)


def _check(pair: SourcePair) -> SourcePair | str:
    if not (pair.prompt.strip() and pair.chosen and pair.rejected):
        return "empty_text"
    if pair.chosen == pair.rejected:
        return "identical_answers"
    if (len(pair.prompt) > MAX_TEXT_CHARS - REPHRASE_ROOM
            or max(len(pair.chosen), len(pair.rejected)) > MAX_TEXT_CHARS):
        return "text_too_long"
    return pair


def parse_lines(lines: Iterable[str]) -> SourceRows:
    """Valid pairs and skipped-row counts of source lines (blank lines are ignored)."""
    rows = SourceRows()
    for line in lines:
        if not line.strip():
            continue
        parsed = parse_row(line)
        if isinstance(parsed, str):
            rows.skipped[parsed] += 1
        else:
            rows.pairs.append(parsed)
    return rows


def read_source(path: Path) -> SourceRows:
    """Read a preference JSONL file (``.gz`` is decompressed)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        return parse_lines(fh)


def split_holdout(pairs: Sequence[SourcePair], share: float, seed: int
                  ) -> tuple[list[SourcePair], list[SourcePair]]:
    """(simulated, held out): about ``share`` of the prompts, with all their rows, held out.

    Grouping by prompt keeps every held-out prompt out of the simulated traffic. Deterministic
    for a given seed; both lists keep file order.
    """
    prompts = sorted({p.prompt for p in pairs})
    random.Random(f"holdout:{seed}").shuffle(prompts)
    held = set(prompts[: round(share * len(prompts))])
    return ([p for p in pairs if p.prompt not in held], [p for p in pairs if p.prompt in held])


def rephrase(prompt: str, rng: random.Random) -> str:
    """A same-intent reformulation: a few words around the last user turn, the rest unchanged."""
    template = rng.choice(REPHRASINGS)
    if prompt.endswith(ASSISTANT_TURN):
        head, turn = _last_turn(prompt.removesuffix(ASSISTANT_TURN))
        return head + template.format(turn.strip()) + ASSISTANT_TURN
    return template.format(prompt.strip())


def _last_turn(dialogue: str) -> tuple[str, str]:
    """(everything up to the last ``Human:`` marker included, that turn's text)."""
    marker = "Human:"
    cut = dialogue.rfind(marker)
    if cut < 0:
        return "", dialogue
    return dialogue[: cut + len(marker)] + " ", dialogue[cut + len(marker):]


def write_labels(path: Path, pairs: Iterable[SourcePair]) -> int:
    """Write pairs as explicit-label JSONL (prompt/chosen/rejected); returns the row count."""
    rows = [json.dumps(p.as_label(), ensure_ascii=False) + "\n" for p in pairs]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(rows), encoding="utf-8")
    tmp.replace(path)
    return len(rows)
