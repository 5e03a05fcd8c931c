"""Padding counter-examples: the answer itself preferred over the answer plus nothing.

For a share of the training comparisons, one more pair is added whose chosen side is the
comparison's chosen answer and whose rejected side is the same answer with content-free text
appended (a closing pleasantry, a restated sentence, a generic remark). The reward-hacking
probes (``trainer/evaluate.py``) use other texts, so they still measure generalisation, not
memorised suffixes. Off by default (``augment_padding = 0``); measured in
``docs/reward-model.md``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

PairDict = dict[str, Any]
SUFFIXES = (
    " Let me know if you have any other questions.",
    " Thanks for asking, and have a great day!",
    " Overall, there are several aspects to keep in mind here.",
    " To sum up, that is the answer to your question.",
    "\n\nPlease feel free to reach out if anything is unclear.",
)


def _last_sentence(text: str) -> str:
    parts = [p for p in re.split(r"(?<=[.!?])\s+", text.strip()) if p]
    return parts[-1] if parts else text.strip()


def padded(answer: str, rng: random.Random) -> str:
    """The answer with a content-free addition (a suffix, or its last sentence repeated)."""
    if rng.random() < 0.25:
        return f"{answer} {_last_sentence(answer)}"
    return answer + rng.choice(SUFFIXES)


def padding_pairs(pairs: Sequence[PairDict], share: float, *, seed: int) -> list[PairDict]:
    """Counter-example pairs for a seeded ``share`` of ``pairs`` (rule ``augment_padding``)."""
    rng = random.Random(seed)
    out = []
    for p in pairs:
        if rng.random() < share:
            out.append({**p, "rejected": padded(p["chosen"], rng), "rule": "augment_padding",
                        "confidence": 1.0, "weight": 1.0,
                        "pair_id": f"{p.get('pair_id', '')}+pad"})
    return out
