"""Helpers for the trainer tests: synthetic pairs, a data dir with sealed and unsealed partitions,
and a tiny BERT backbone (hidden 32, 2 layers) using the packaged MiniLM tokenizer.

Chosen answers are learnable: they say "good helpful correct", rejected ones "bad wrong useless",
so a tiny model shows its loss falling within a few dozen steps.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prefstream.schemas.records import Pair, UnpairedRow
from prefstream.storage.files import (
    Watermark,
    init_data_dir,
    seal_ready,
    write_rows,
    write_watermark,
)
from prefstream.storage.partitions import partition_for

BASE = datetime(2024, 5, 1, tzinfo=timezone.utc)
GAP = timedelta(minutes=30)
UNSEALED_MARK = "zebracorn"  # a word that appears only in unsealed partitions
TOPICS = ("tea", "rust", "paris", "tax", "yoga", "bread", "sql", "mars", "jazz", "chess")


def make_pair(i: int, *, hour: int = 0, prompt: str | None = None, user: str | None = None,
              chosen: str | None = None, rejected: str | None = None, rule: str = "thumbs",
              confidence: float = 0.9, minute: int = 0) -> Pair:
    """A synthetic pair in the partition of ``BASE + hour``."""
    topic = TOPICS[i % len(TOPICS)]
    ts = BASE + timedelta(hours=hour, minutes=minute % 60)
    prompt = prompt if prompt is not None else f"question {i} about {topic} in hour {hour}?"
    return Pair(
        pair_id=hashlib.sha256(f"{i}-{hour}-{prompt}".encode()).hexdigest()[:16],
        rule=rule, rules=(rule,), confidence=confidence, propensity_weight=1.0,
        prompt=prompt,
        chosen=chosen if chosen is not None else f"{topic}: good helpful correct answer {i}.",
        rejected=rejected if rejected is not None else f"{topic}: bad wrong useless answer {i}.",
        session_id=f"s{i}", user_id=user if user is not None else f"u{i % 7}",
        request_id=f"r{i}", rejected_request_id=f"r{i}", chosen_response_id=f"a{i}",
        rejected_response_id=f"b{i}", chosen_model="m1", rejected_model="m1",
        chosen_position=0, rejected_position=1, event_time=ts, session_start=ts,
        session_end=ts, partition=partition_for(ts),
    )


def make_unpaired(i: int, *, hour: int = 0, label: bool = True) -> UnpairedRow:
    ts = BASE + timedelta(hours=hour)
    return UnpairedRow(
        row_id=f"row{i}-{hour}", prompt=f"lone prompt {i}", completion=f"lone answer {i}",
        label=label, signal="thumbs_up" if label else "thumbs_down", confidence=0.95,
        session_id=f"s{i}", user_id="u1", request_id=f"r{i}", response_id=f"a{i}",
        model_version="m1", position=0, event_time=ts, partition=partition_for(ts),
    )


def hour_pairs(hour: int, n: int) -> list[Pair]:
    return [make_pair(hour * 1000 + i, hour=hour, minute=i) for i in range(n)]


def build_data_dir(root: Path, *, sealed_hours: int, pairs_per_hour: int = 16,
                   unsealed: bool = True) -> Path:
    """``sealed_hours`` sealed partitions of synthetic pairs, then one unsealed partition whose
    texts all contain ``UNSEALED_MARK``."""
    init_data_dir(root)
    add_sealed_hours(root, range(sealed_hours), pairs_per_hour)
    if unsealed:
        hour = sealed_hours
        rows = [make_pair(90_000 + i, hour=hour, minute=i,
                          prompt=f"{UNSEALED_MARK} prompt {i}?",
                          chosen=f"{UNSEALED_MARK} good helpful correct {i}.",
                          rejected=f"{UNSEALED_MARK} bad wrong useless {i}.")
                for i in range(pairs_per_hour)]
        write_rows(data_dir=root, table="pairs", rows=rows)
    return root


def add_sealed_hours(root: Path, hours: range, pairs_per_hour: int) -> list[str]:
    """Write pairs for the hours, advance the watermark past them, seal; returns new seals."""
    for hour in hours:
        write_rows(data_dir=root, table="pairs", rows=hour_pairs(hour, pairs_per_hour))
        write_rows(data_dir=root, table="unpaired", rows=[make_unpaired(hour, hour=hour)])
    mark = BASE + timedelta(hours=hours.stop) + GAP
    write_watermark(data_dir=root, mark=Watermark(kafka_partition=0, watermark=mark,
                                                  applied_offset=0, open_sessions=0))
    return seal_ready(data_dir=root, n_kafka_partitions=1, gap=GAP)


@functools.lru_cache(maxsize=1)
def tiny_backbone() -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) saved with the MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from prefstream.trainer.config import default_backbone

    path = Path(tempfile.mkdtemp(prefix="tiny-bert-"))
    atexit.register(shutil.rmtree, path, True)
    tokenizer = AutoTokenizer.from_pretrained(default_backbone())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_config(**overrides: Any) -> Any:
    """A fast TrainConfig on the tiny backbone (no environment variables read)."""
    from prefstream.trainer.config import TrainConfig

    fields: dict[str, Any] = dict(
        backbone=tiny_backbone(), max_length=64, batch_size=8, lr=3e-3, head_lr=1e-2,
        epochs=6, head_epochs=1, eval_window_partitions=1, gap_partitions=1,
        min_train_pairs=8, min_eval_pairs=4, probe_answers=8, device="cpu",
        # the tiny model learns words, so repeating a good sentence raises its reward: the probe
        # gate is tested on its own (test_trainer_gates.py), not in every cycle
        max_probe_raise=1.0,
    )
    fields.update(overrides)
    return TrainConfig(_env_prefix="PREFSTREAM_TEST_UNUSED_", **fields)


def write_labels(path: Path, n: int, *, agree: bool) -> Path:
    """Explicit labels: chosen is the good-pattern answer when ``agree``, else the bad one."""
    import json

    good = "label {i}: good helpful correct answer."
    bad = "label {i}: bad wrong useless answer."
    rows = [{"prompt": f"labelled question {i}?", "chosen": (good if agree else bad).format(i=i),
             "rejected": (bad if agree else good).format(i=i)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
