"""``prefstream``: one console script, one subcommand per job.

Exit codes: 0 ok, 1 the job ran and failed a check, 2 bad usage or configuration (one line on
stderr naming the flag or variable to change, nothing created), 130 stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

# Before anything imports pyarrow, which picks its memory pool once, from this variable: with
# pyarrow's default (mimalloc) a long-running worker grew about six times faster than with
# jemalloc (benchmarks/soak.py). A user's own choice stands.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")

from pydantic import ValidationError  # noqa: E402

from prefstream import evaluate, report, simulate, status  # noqa: E402
from prefstream.args import (  # noqa: E402,F401  (re-exported: the commands' shared plumbing)
    add_settings_flags,
    describe_validation,
    positive_float,
    positive_int,
    settings_from,
)
from prefstream.errors import PrefstreamError  # noqa: E402
from prefstream.logs import log_format, setup_logging  # noqa: E402
from prefstream.trainer import cli as trainer_cli  # noqa: E402

#: modules adding subcommands through ``register(subparsers)``, in the help's order
COMMANDS = (trainer_cli, simulate, evaluate, status, report)
#: their names (the settings doc finds each one's settings models)
COMMAND_MODULES = tuple(module.__name__ for module in COMMANDS)
SETTINGS_FLAGS = (
    "kafka_bootstrap", "data_dir", "app_id", "events_topic", "partitions", "gap_s", "grace_s",
    "idle_s", "tick_interval_s", "flush_interval_s", "flush_max_events", "rebalance_timeout_s",
    "max_events_per_session", "max_open_sessions", "max_future_s", "max_message_bytes",
    "metrics_host", "metrics_port",
)


class Parser(argparse.ArgumentParser):
    """argparse with bad usage on one line: ``prefstream demo: argument --events: ...``."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _cmd_schema(args: argparse.Namespace) -> int:
    from prefstream.schemas.events import event_json_schema

    print(json.dumps(event_json_schema(), indent=2))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from prefstream.streams.worker.run import run_worker

    return run_worker(settings_from(args, SETTINGS_FLAGS), loglevel=args.loglevel)


def _cmd_demo(args: argparse.Namespace) -> int:
    from prefstream.sim.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from prefstream.datadir import DATA_DIR_ENV, default_data_dir

    parser = Parser(prog="prefstream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schema", help="print the JSON Schema of feedback events")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("worker", help="run a stream worker (Faust) until SIGTERM")
    add_settings_flags(p, SETTINGS_FLAGS)
    p.add_argument("--loglevel", default="info", help="worker log level [default: info]")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("demo", help="embedded broker + worker + traffic generator, end to end")
    p.add_argument("--events", type=positive_int, default=5000,
                   help="events to generate [default: 5000]")
    p.add_argument("--seed", type=int, default=0, help="traffic seed [default: 0]")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help=f"data dir, the one every command reads [env: {DATA_DIR_ENV}] "
                        "[default: prefstream-data]")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--timeout", type=positive_float, default=300.0,
                   help="give up waiting for the worker after this many seconds [default: 300]")
    p.add_argument("--no-train", action="store_true", help="skip the trainer cycle at the end")
    p.set_defaults(func=_cmd_demo)

    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(0o077)  # every file a command writes (data, models, reports) is owner-only
    try:
        setup_logging(verbose=args.verbose, fmt=log_format())
        return int(args.func(args))
    except ValidationError as exc:
        problem = describe_validation(exc, flags=vars(args))  # the flags this command has
        print(f"prefstream {args.command}: {problem}", file=sys.stderr)
        return 2
    except PrefstreamError as exc:
        print(f"prefstream {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prefstream {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
