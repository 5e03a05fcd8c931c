"""Baseline for bench_pipeline: a Faust agent that only parses JSON (per event, or take(5000)).

Run as ``python benchmarks/naive_faust.py BOOTSTRAP TOPIC N MODE OUT`` (MODE: event | take); it
writes ``{"first": t, "last": t, "n": N}`` (wall-clock seconds) to OUT after N messages.
"""

from __future__ import annotations

import json
import os
import sys
import time

import faust


def main() -> None:
    bootstrap, topic_name, n, mode, out = sys.argv[1:6]
    total = int(n)
    app = faust.App(f"naive-{mode}-{os.getpid()}", broker=f"kafka://{bootstrap}",
                    store="memory://", web_enabled=False, broker_rebalance_timeout=2.0,
                    broker_session_timeout=10.0, broker_heartbeat_interval=1.0,
                    consumer_auto_offset_reset="earliest", datadir=f"/tmp/naive-{os.getpid()}")
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, value_serializer="raw")
    seen = {"n": 0, "first": 0.0}

    def done() -> None:
        with open(out, "w") as fh:
            json.dump({"first": seen["first"], "last": time.time(), "n": seen["n"]}, fh)
        os._exit(0)

    @app.agent(topic)
    async def parse(stream: faust.StreamT) -> None:
        batches = stream.take(5000, within=0.5) if mode == "take" else _single(stream)
        async for values in batches:
            if not seen["first"]:
                seen["first"] = time.time()
            for value in values:
                try:
                    json.loads(value)
                except ValueError:
                    pass
            seen["n"] += len(values)
            if seen["n"] >= total:
                done()

    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()


async def _single(stream: faust.StreamT):  # type: ignore[no-untyped-def]
    async for value in stream:
        yield [value]


if __name__ == "__main__":
    main()
