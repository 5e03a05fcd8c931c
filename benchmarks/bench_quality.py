"""Pair quality and the reward model's held-out agreement: ``prefstream simulate`` + ``evaluate``.

    python benchmarks/bench_quality.py [--source ../shared/data/hh-rlhf-harmless-dev.jsonl.gz]
        [--events 5000] [--out benchmarks/results/quality.json]

Runs the two product commands as an operator would, in a temporary data dir: ``prefstream
simulate`` (embedded broker and worker; the source's held-out prompts become explicit labels)
and ``prefstream evaluate --train`` (precision and yield of the stored pairs at the default
confidence threshold against the simulator's truth, the precision/yield curve, then one trainer
cycle and its calibration audit on the held-out labels). Both JSON summaries are kept whole.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from machine import (  # noqa: E402
    LoadMonitor,
    command_line,
    elapsed_since,
    machine_info,
    now_iso,
    write_result,
)

DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"


def run_json(cmd: list[str], timeout_s: float, log: Path) -> dict[str, Any]:
    """Run a ``prefstream ... --json`` command; its parsed stdout, or SystemExit with why."""
    print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    with open(log, "ab") as err:
        try:
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, timeout=timeout_s,
                                  cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
        except subprocess.TimeoutExpired:
            raise SystemExit(f"bench_quality: {cmd[1]} did not finish in {timeout_s:.0f} s "
                             f"(--timeout); see {log}") from None
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-8:]
        raise SystemExit(f"bench_quality: {cmd[1]} exited with {done.returncode}:\n  "
                         + "\n  ".join(tail))
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="preference JSONL (.gz) "
                        "for `prefstream simulate --source`; '' = the built-in synthetic texts")
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=None, help="trainer max_length "
                        "(default: the trainer's)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds each command "
                        "may take")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quality.json")
    args = parser.parse_args(argv)
    if args.source and not Path(args.source).exists():
        parser.error(f"no source file {args.source} (pass --source '' for synthetic texts)")
    started, when = time.perf_counter(), now_iso()
    exe = [sys.executable, "-m", "prefstream.cli"]
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp, LoadMonitor() as load:
        data, log = Path(tmp) / "data", Path(tmp) / "commands.log"
        simulate = [*exe, "simulate", "--events", str(args.events), "--seed", str(args.seed),
                    "--data-dir", str(data), "--timeout", str(args.timeout), "--json",
                    *(["--source", os.path.relpath(args.source, ROOT)] if args.source else [])]
        evaluate = [*exe, "evaluate", "--data-dir", str(data), "--train", "--json",
                    *(["--max-length", str(args.max_length)] if args.max_length else [])]
        simulated = run_json(simulate, args.timeout, log)
        evaluated = run_json(evaluate, args.timeout, log)
    shown = [shlex.join(["prefstream", *c[3:]]).replace(str(data), "<tmp>")
             for c in (simulate, evaluate)]
    write_result(args.out, {
        "benchmark": "quality", "command": command_line(__file__, argv), "started": when,
        "commands": shown, "simulate": simulated, "evaluate": evaluated,
        "machine": machine_info(), "load": load.summary(), "wall_s": elapsed_since(started)})
    training = evaluated.get("training", {})
    print(f"precision {evaluated['precision']} at confidence >= {evaluated['default_threshold']}, "
          f"{evaluated['per_1000_events']} pairs per 1,000 events; held-out agreement "
          f"{training.get('heldout_agreement')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
