"""Trainer: turn sealed preference pairs into a versioned, audited Bradley-Terry reward model.

Read top to bottom: ``config`` (TrainConfig), ``data`` (temporal + grouped split, quality gates,
all pure), ``comparisons`` (votes aggregated), ``lengths`` (truncation policy, length buckets and
balancing), ``augment``, ``gates`` (data and promotion gates), ``loss``, ``model`` (backbone,
tokens, collator), ``fit`` (setup then fit), ``evaluate`` (metrics, calibration audit,
reward-hacking probes), ``registry`` (versions, promotion, the ``models`` view), ``service`` (one
cycle and the polling loop), ``scoring``, ``score_file``, ``export`` and ``cli``.
Importing this package loads neither torch nor transformers.
"""

from prefstream.errors import PrefstreamError


class TrainerError(PrefstreamError):
    """The trainer cannot go on (locked registry, unreadable version, bad input file)."""


class Interrupted(TrainerError):
    """A stop was requested (SIGTERM) while training; no version was written."""
