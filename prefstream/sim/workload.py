"""What the traffic simulator is asked for (``TrafficConfig``) and what it returns (``Traffic``,
with the ground truth that :func:`prefers` reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from prefstream.sim.content import SourcePair


@dataclass(frozen=True, kw_only=True)
class TrafficConfig:
    """What to generate; ``end`` (tz-aware) is the latest event time.

    ``source``: a preference JSONL file as content (None = the built-in synthetic texts);
    ``prefer_prob``: how often a user perceives the truly chosen answer of a row as the better;
    ``holdout``: share of the file's prompts never simulated (returned as ``Traffic.holdout``).
    """

    n_events: int = 5000
    seed: int = 0
    end: datetime
    hours: int = 12
    n_users: int = 200
    bad_share: float = 0.02
    duplicate_share: float = 0.01
    late_share: float = 0.005
    shuffle_window: int = 5
    source: Path | None = None
    prefer_prob: float = 0.8
    holdout: float = 0.2

    def __post_init__(self) -> None:
        if self.end.tzinfo is None or self.end.utcoffset() is None:
            raise ValueError("end must be timezone-aware")
        if self.n_events < 1 or self.n_users < 1 or self.hours < 2 or self.shuffle_window < 0:
            raise ValueError("need n_events >= 1, n_users >= 1, hours >= 2, shuffle_window >= 0")
        for share in (self.bad_share, self.duplicate_share, self.late_share):
            if not 0.0 <= share < 0.5:
                raise ValueError("shares must be in [0, 0.5)")
        if not 0.0 <= self.prefer_prob <= 1.0 or not 0.0 <= self.holdout < 1.0:
            raise ValueError("need prefer_prob in [0, 1] and holdout in [0, 1)")


@dataclass
class Traffic:
    """Generated messages plus the ground truth needed to check what a consumer makes of them."""

    messages: list[tuple[bytes, bytes]]
    quality: dict[str, float]
    counts: dict[str, int]
    bad_reasons: dict[str, int]
    labels: list[str] = field(default_factory=list)  # per message: valid|duplicate|late|bad:<kind>
    skipped: dict[str, int] = field(default_factory=dict)  # source rows skipped, by reason
    holdout: list[SourcePair] = field(default_factory=list)  # source rows never simulated


def prefers(
    quality: dict[str, float], chosen_response_id: str, rejected_response_id: str
) -> bool | None:
    """Ground truth: is ``chosen`` better than ``rejected``? None if either is unknown or equal."""
    a, b = quality.get(chosen_response_id), quality.get(rejected_response_id)
    if a is None or b is None or a == b:
        return None
    return a > b
