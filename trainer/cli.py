"""Subcommands ``trainer``, ``score``, ``rerank`` and ``export`` for the ``prefstream`` script.

Every ``TrainConfig`` field is a ``trainer`` flag (``max_length`` -> ``--max-length``) that
overrides ``PREFSTREAM_TRAIN_<FIELD>``. Torch and transformers load only when a command runs.
``prefstream/cli.py`` registers these subcommands explicitly (its ``COMMANDS``); the ``models``
catalog view is registered with every other view in ``storage.catalog``, not by an import.

Exit codes: 0 done (a model was promoted, or nothing new to do; the service stopped by SIGTERM),
1 error, 2 bad usage or config, 3 the cycle ran but promoted nothing (too little data, or a gate
failed), 4 ``--once`` stopped by SIGTERM or SIGINT before a version was written (nothing saved;
the next run starts the cycle over).

``PREFSTREAM_TRAINER_PAUSE_AT`` is a crash-test hook, not a setting: see ``trainer.control``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from prefstream.args import describe_validation
from prefstream.datadir import check_data_dir, check_writable, default_data_dir
from prefstream.errors import PrefstreamError
from prefstream.trainer import Interrupted
from prefstream.trainer.config import ENV_PREFIX, TrainConfig
from prefstream.trainer.control import PAUSE_ENV, pause_points, stop_on_signals

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_PROMOTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4
DATA_DIR_ENV = "PREFSTREAM_DATA_DIR"


def usage_error(command: str, message: object) -> int:
    """Bad usage: one line naming what to change, exit code 2."""
    print(f"prefstream {command}: {message}", file=sys.stderr)
    return EXIT_USAGE


def _checked_data_dir(args: argparse.Namespace, command: str, *, writes: bool = False
                      ) -> bool:
    """Whether ``--data-dir`` is a data dir (and writable when the command writes there);
    prints the usage error when not, before anything is created."""
    try:
        check_data_dir(args.data_dir)
        if writes:
            check_writable(args.data_dir, needed_by=f"prefstream {command}")
    except PrefstreamError as exc:
        usage_error(command, exc)
        return False
    return True


def register(subparsers: Any) -> None:
    """Add the trainer's subcommands to an ``add_subparsers()`` object."""
    train = subparsers.add_parser("trainer", help="Retrain the reward model on sealed partitions.")
    _data_dir(train)
    train.add_argument("--once", action="store_true", help="Run one cycle, print its summary "
                       "as JSON and exit (default: poll every --poll-interval-s).")
    for name, info in TrainConfig.model_fields.items():
        help_text = (info.description or "").replace("%", "%%")
        kind = ({"action": "store_const", "const": True} if info.annotation is bool
                else {"type": _flag_type(info.annotation)})
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, **kind,
                           help=f"{help_text} (default: {info.default}) [env: {ENV_PREFIX}"
                                f"{name.upper()}]")
    train.set_defaults(func=run_trainer)
    _scoring_parsers(subparsers)
    export = subparsers.add_parser("export", help="Write sealed pairs as TRL or KTO JSONL.")
    _data_dir(export)
    export.add_argument("--format", choices=("trl", "kto"), default="trl",
                        help="trl: prompt/chosen/rejected; kto: prompt/completion/label.")
    export.add_argument("--out", type=Path, required=True, help="JSONL file to write.")
    export.add_argument("--partitions", nargs="+", default=None,
                        help="Sealed partitions to export (default: all sealed).")
    export.add_argument("--margin-coef", type=float, default=None,
                        help="trl only: add margin = coef * max(confidence - 0.5, 0).")
    export.set_defaults(func=run_export)


def _scoring_parsers(subparsers: Any) -> None:
    score = subparsers.add_parser("score", help="Reward of one answer under the current model, "
                                  "or (--pairs) accuracy on a labelled JSONL file.")
    rerank = subparsers.add_parser("rerank", help="Answers ordered by reward, best first (JSONL).")
    for parser in (score, rerank):
        _data_dir(parser)
        parser.add_argument("--prompt", required=parser is rerank)
        parser.add_argument("--version", default=None, help="A model version (default: current).")
        parser.add_argument("--device", default=os.environ.get(f"{ENV_PREFIX}DEVICE", "auto"),
                            help=f"auto, cpu or cuda [env: {ENV_PREFIX}DEVICE]")
    score.add_argument("--answer", help="The answer to score (with --prompt).")
    score.add_argument("--pairs", type=Path, metavar="FILE", help="Labelled JSONL (.gz ok): "
                       "prompt/chosen/rejected or HH-RLHF chosen/rejected dialogues; reports "
                       "accuracy, length-matched accuracy, by length bucket, the length-only "
                       "baseline, reward-length correlation, rows truncated or dropped.")
    score.add_argument("--length-tolerance", type=float, default=0.1, help="With --pairs: "
                       "answers within this share of each other's length are length-matched.")
    score.add_argument("--json", action="store_true", help="With --pairs: print JSON.")
    score.set_defaults(func=run_score)
    rerank.add_argument("answers", nargs="+", help="Candidate answers.")
    rerank.set_defaults(func=run_rerank)


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help=f"Data dir of the stored pairs and models [env: {DATA_DIR_ENV}]")


def _flag_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``: the type argparse converts a flag's text with."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _config(args: argparse.Namespace) -> TrainConfig | None:
    flags = {name: getattr(args, name) for name in TrainConfig.model_fields
             if getattr(args, name, None) is not None}
    try:
        return TrainConfig(**flags)
    except ValidationError as exc:
        usage_error("trainer", describe_validation(exc, flags=TrainConfig.model_fields,
                                                   prefix=ENV_PREFIX, what="trainer config"))
        return None


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                            "%(message)s")


def run_trainer(args: argparse.Namespace) -> int:
    config = _config(args)
    if config is None:
        return EXIT_USAGE
    if not _checked_data_dir(args, "trainer", writes=True):
        return EXIT_USAGE
    try:
        pause_at = pause_points(os.environ.get(PAUSE_ENV, ""))
    except PrefstreamError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging()
    from prefstream.trainer.service import run_once, serve

    try:
        if not args.once:
            serve(args.data_dir, config, pause_at=pause_at)
            return EXIT_OK
        with stop_on_signals() as stop:
            result = run_once(args.data_dir, config, should_stop=stop.is_set, pause_at=pause_at)
    except Interrupted as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PrefstreamError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(result.summary() if result else {"status": "no new sealed partitions"},
                     indent=2))
    return EXIT_OK if result is None or result.promoted else EXIT_NOT_PROMOTED


def _load_model(args: argparse.Namespace, command: str) -> Any:
    """The model ``args`` name, or None after printing why it cannot be loaded."""
    from prefstream.trainer.scoring import RewardModel

    try:
        return RewardModel.load(args.data_dir, version=args.version, device=args.device)
    except PrefstreamError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return None


def run_score(args: argparse.Namespace) -> int:
    if not _checked_data_dir(args, "score"):
        return EXIT_USAGE
    problem = _score_usage(args)
    if problem:
        print(f"score: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.pairs is not None:
        from prefstream.trainer.score_file import read_pairs_file

        try:  # read before the model loads: a bad file is one line and nothing else
            rows = read_pairs_file(args.pairs)
        except PrefstreamError as exc:
            print(f"score: {exc}", file=sys.stderr)
            return EXIT_USAGE
    model = _load_model(args, "score")
    if model is None:
        return EXIT_ERROR
    if args.pairs is None:
        print(f"{model.score(args.prompt, args.answer):.6f}")
        return EXIT_OK
    from prefstream.trainer.score_file import format_report, score_file

    report = score_file(model, args.pairs, rows, tolerance=args.length_tolerance)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return EXIT_OK


def _score_usage(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags of ``score`` (None when nothing)."""
    if args.pairs is not None:
        if args.prompt is not None or args.answer is not None:
            return "--pairs scores a file: give it without --prompt/--answer"
        if not args.pairs.is_file():
            return f"--pairs: no file {args.pairs}"
        if not 0 <= args.length_tolerance <= 1:
            return "--length-tolerance must be between 0 and 1"
        return None
    if args.prompt is None or args.answer is None:
        return "give --prompt and --answer, or --pairs FILE"
    return None


def run_rerank(args: argparse.Namespace) -> int:
    if not _checked_data_dir(args, "rerank"):
        return EXIT_USAGE
    model = _load_model(args, "rerank")
    if model is None:
        return EXIT_ERROR
    for rank, (answer, reward) in enumerate(model.rerank(args.prompt, args.answers), start=1):
        print(json.dumps({"rank": rank, "score": reward, "answer": answer}, ensure_ascii=False))
    return EXIT_OK


def run_export(args: argparse.Namespace) -> int:
    from prefstream.trainer.export import export_kto, export_preferences

    if not _checked_data_dir(args, "export"):
        return EXIT_USAGE
    try:
        if args.format == "kto":
            n = export_kto(args.data_dir, args.out, partitions=args.partitions)
        else:
            n = export_preferences(args.data_dir, args.out, partitions=args.partitions,
                                   margin_coef=args.margin_coef)
    except PrefstreamError as exc:
        print(f"export: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote {n} lines to {args.out}")
    return EXIT_OK
