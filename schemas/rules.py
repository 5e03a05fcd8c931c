"""Typed configuration of the core's rules: the pair rules' thresholds (``RuleConfig``, the
settings' ``PREFSTREAM_RULES__<FIELD>``, see ``docs/pair-rules.md``) and the session rules
(``SessionRules``, built from the settings). At the base, so the settings need not import the
core that applies them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field


class RuleConfig(BaseModel):
    """Thresholds of the pairing rules; every confidence is in [0, 1]."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_confidence: float = Field(0.5, ge=0, le=1, description="Pairs below are refused.")
    thumbs_confidence: float = Field(0.95, ge=0, le=1, description="Explicit up vs down.")
    copy_confidence: float = Field(0.8, ge=0, le=1, description="Copied vs skipped answer.")
    click_confidence: float = Field(0.6, ge=0, le=1, description="Dwelled click vs skipped above.")
    min_dwell_ms: int = Field(5000, ge=0, description="Shorter clicks are ambiguous, refused.")
    regenerate_confidence: float = Field(0.7, ge=0, le=1, description="Accepted vs regenerated.")
    edit_confidence: float = Field(0.75, ge=0, le=1, description="Edited text vs original.")
    reformulate_confidence: float = Field(
        0.55, ge=0, le=1, description="Accepted answer after a reformulation vs the old answer."
    )
    reformulate_min_similarity: float = Field(
        0.5, ge=0, le=1, description="Token Jaccard of normalized prompts; below = new intent."
    )
    reformulate_max_gap_s: float = Field(
        120.0, ge=0, description="Max seconds from the old answer's impression to reformulating."
    )
    examination_eta: float = Field(1.0, ge=0, description="P(examine slot k) = 1/(k+1)**eta.")
    max_propensity_weight: float = Field(10.0, ge=1, description="Clip of inverse propensity.")
    # read by the writer, not the rules (``Settings.partition_hours``); set here as it always was
    partition_hours: int = Field(1, ge=1, le=24, description="Hours per storage partition.")


@dataclass(frozen=True)
class SessionRules:
    gap: timedelta = timedelta(minutes=30)
    grace: timedelta = timedelta(minutes=5)
    idle: timedelta = timedelta(seconds=30)
    max_events: int = 500
    max_duration: timedelta = timedelta(hours=6)
    #: state one session id may hold (its changelog record); None: no bound. A session closes
    #: early (``max_bytes``) before its events pass half of it; see :func:`add_event`
    max_bytes: int | None = None
    #: how long after a worker tick the next one is certainly appended (two tick intervals)
    tick_slack: timedelta = timedelta(seconds=10)
