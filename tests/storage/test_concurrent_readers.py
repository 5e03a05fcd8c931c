"""Readers in other processes while the worker's flush loop writes, seals, compacts and deletes.

A writer process runs the real pipeline (``Pipeline.write_flush``: ``write_rows``, ``seal_ready``,
then ``compact_after_flush``) over generated traffic, flushing every few dozen events with a
compaction threshold of 3 files and a 1 s grace, so merges and deletions happen all the time.
Two analyst processes query the catalog's views (pairs by rule, funnel, partitions) through
``connect_readonly``, either over one long session or connecting for each round as the CLI
does; a trainer process loads sealed partitions as the trainer does (``sealed_partitions``,
``read_table``, ``trainer.data``). Every reader must finish with zero errors, never see an id
twice, never see a count go down, and the final state must be exactly what one flush of the same
records writes. While a session holds the catalog, compactions wait (the ``current`` link is
never swapped under a connected reader); between one-shot connections they happen, and old
generations are deleted after the grace while the trainer reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from helpers.storage import ARRIVAL_MS, canonical, traffic_records

from prefstream.settings import Settings
from prefstream.storage.catalog import ensure_catalog
from prefstream.storage.compact import GC, TODO, compact_after_flush, marked
from prefstream.storage.files import init_data_dir, read_table, sealed_partitions
from prefstream.storage.partitions import CURRENT
from prefstream.storage.tables import SEALED_TABLES, TABLES
from prefstream.streams.worker.pipeline import replay

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
N_EVENTS = 1000
GRACE_S = 1.0

WRITER = r"""
import json, logging, sys, time
from datetime import timedelta
from pathlib import Path
from prefstream.settings import Settings
from prefstream.storage.compact import compact_after_flush
from helpers.storage import feed_pipeline, traffic_records

data_dir, n_events, grace_s = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
counts = {"compacted": 0, "removed": 0}


class Count(logging.Handler):
    def emit(self, record):
        words = record.getMessage().split()
        if words[0] == "compacted":
            counts["compacted"] += 1
        elif words[0] == "removed":
            counts["removed"] += int(words[1])


logging.getLogger("prefstream.storage.compact").addHandler(Count())
logging.getLogger("prefstream.storage.compact").setLevel(logging.INFO)
settings = Settings(data_dir=data_dir, partitions=2, metrics_port=0, compaction_max_files=3,
                    compaction_grace_s=grace_s)
records = traffic_records(n_events, 2)
started = time.time()
flushes = feed_pipeline(settings, records, flush_every=16, pause_s=0.02)
during = dict(counts)
time.sleep(grace_s)  # then one more pass: every superseded file is due
compact_after_flush(data_dir=data_dir, sealed=[], written={}, max_files=3,
                    grace=timedelta(seconds=grace_s))
print(json.dumps({**during, "flushes": flushes, "started": started, "ended": time.time(),
                  "removed_at_end": counts["removed"] - during["removed"]}))
"""

ANALYST = r"""
import json, sys, time
from pathlib import Path
from prefstream.storage.catalog import connect_readonly

data_dir, stop, session = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "session"
TABLES = {"pairs": "pair_id", "ties": "tie_id", "unpaired": "row_id", "refusals": "refusal_id",
          "sessions": "session_key", "dead_letters": "dead_letter_id", "late_events": "late_id"}
ROWS = " UNION ALL ".join(f"SELECT '{t}', count(*), count(DISTINCT {c}) FROM {t}"
                          for t, c in TABLES.items())
con = connect_readonly(data_dir) if session else None
print("ready", flush=True)
last = False
while not last:
    last = stop.exists()  # one more round after the writer is done
    try:
        started = time.time()
        if not session:  # as ``duckdb -readonly prefstream.duckdb "..."`` does, now and then
            time.sleep(0.3)
            con = connect_readonly(data_dir)
        rows = {t: [n, d] for t, n, d in con.execute(ROWS).fetchall()}
        by_rule = con.execute("SELECT rule, count(*), avg(confidence) FROM pairs "
                              "GROUP BY 1 ORDER BY 2 DESC").fetchall()
        funnel = con.execute("SELECT coalesce(sum(sessions), 0), coalesce(sum(pairs), 0) "
                             "FROM funnel").fetchone()
        parts = con.execute("SELECT count(*) FILTER (WHERE sealed), coalesce(sum(n_pairs), 0), "
                            "count(*) - count(DISTINCT partition) FROM partitions").fetchone()
        print(json.dumps({"t": started, "queries": 4, "rows": rows,
                          "by_rule": sum(n for _, n, _ in by_rule), "funnel": list(funnel),
                          "sealed": parts[0], "partition_pairs": parts[1],
                          "partition_dupes": parts[2]}), flush=True)
    except Exception as exc:
        print(json.dumps({"t": time.time(), "error": repr(exc)}), flush=True)
    finally:
        if not session:
            con.close()
if session:
    con.close()
"""

TRAINER = r"""
import json, sys, time
from pathlib import Path
from prefstream.storage.files import read_table, sealed_partitions
from prefstream.trainer.data import temporal_split, within_split

data_dir, stop = Path(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
last = False
while not last:
    last = stop.exists()
    try:
        started = time.time()
        manifest = sealed_partitions(data_dir)
        pairs = read_table(data_dir=data_dir, table="pairs",
                           partitions=[r.partition for r in manifest]).to_pylist()
        per = {}
        for p in pairs:
            per[p["partition"]] = per.get(p["partition"], 0) + 1
        short = [r.partition for r in manifest if per.get(r.partition, 0) < r.n_pairs]
        split = temporal_split(manifest, eval_window=1, gap=0)
        train = within_split(pairs, split.names("train"), split.cutoff)[0] if split else []
        ids = [p["pair_id"] for p in pairs]
        print(json.dumps({"t": started, "queries": 1, "sealed": len(manifest), "pairs": len(ids),
                          "distinct": len(set(ids)), "short": short, "train": len(train)}),
              flush=True)
    except Exception as exc:
        print(json.dumps({"t": time.time(), "error": repr(exc)}), flush=True)
"""


def spawn(script: str, args: list[str], out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    with open(out, "wb") as fh:
        return subprocess.Popen([sys.executable, "-c", script, *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_ready(out: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not out.read_text().startswith("ready"):
        assert proc.poll() is None, out.read_text()
        assert time.monotonic() < deadline, f"{out.name}: reader never started"
        time.sleep(0.05)


def results(out: Path) -> list[dict]:
    lines = out.read_text().splitlines()
    assert lines[0] == "ready", lines[:5]
    return [json.loads(line) for line in lines[1:]]


def nondecreasing(values: list[int]) -> bool:
    return all(a <= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("analysts", ["session", "one-shot"])
def test_readers_never_fail_nor_see_a_row_twice_while_the_worker_writes_and_compacts(
        tmp_path, analysts):
    data_dir, stop = tmp_path / "data", tmp_path / "writer-done"
    init_data_dir(data_dir)
    assert ensure_catalog(data_dir)
    readers = {f"analyst-{i}": (ANALYST, tmp_path / f"analyst-{i}.out") for i in range(2)}
    readers["trainer"] = (TRAINER, tmp_path / "trainer.out")
    procs = {name: spawn(script, [str(data_dir), str(stop), analysts], out)
             for name, (script, out) in readers.items()}
    writer = None
    try:
        for name, proc in procs.items():
            wait_ready(readers[name][1], proc)
        writer = spawn(WRITER, [str(data_dir), str(N_EVENTS), str(GRACE_S)],
                       tmp_path / "writer.out")
        assert writer.wait(timeout=120) == 0, (tmp_path / "writer.out").read_text()
        stop.touch()
        for name, proc in procs.items():
            assert proc.wait(timeout=60) == 0, readers[name][1].read_text()[-2000:]
    finally:
        for proc in [*procs.values(), *([writer] if writer else [])]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    report = json.loads((tmp_path / "writer.out").read_text().splitlines()[-1])
    assert report["flushes"] > 50
    if analysts == "session":  # sessions held the catalog the whole time: nothing swapped
        assert report["compacted"] == report["removed"] == 0
        assert len(marked(data_dir, TODO)) > 10  # sealed partitions waiting for their turn
    else:  # merged between the analysts' connections, old generations deleted while reading
        # how many windows open between connections depends on the machine's load: at least
        # two merges and one deletion happen while readers come and go
        assert report["compacted"] >= 2 and report["removed"] >= 1
    # no reader left: what waited is compacted over the next flushes, old generations go
    for _ in range(20):
        compact_after_flush(data_dir=data_dir, sealed=[], written={}, max_files=3,
                            grace=timedelta(0))
        if not marked(data_dir, TODO):
            break
    assert marked(data_dir, TODO) == [] == marked(data_dir, GC)
    runs = {name: results(out) for name, (_, out) in readers.items()}
    errors = {name: [r for r in rows if "error" in r] for name, rows in runs.items()}
    assert errors == {name: [] for name in runs}
    during = {name: sum(r["queries"] for r in rows
                        if report["started"] <= r["t"] <= report["ended"])
              for name, rows in runs.items()}
    print(f"\n{analysts} analysts: read queries during writes {during} "
          f"({sum(during.values())} in all); writer: {report['flushes']} flushes, "
          f"{report['compacted']} compactions, {report['removed']} old generations removed "
          f"while reading")
    assert all(n >= 10 for n in during.values()), during

    for name in ("analyst-0", "analyst-1"):
        rows = runs[name]
        for r in rows:
            assert all(n == d for n, d in r["rows"].values()), r  # no id twice
            assert r["partition_dupes"] == 0
        for table in TABLES:
            assert nondecreasing([r["rows"][table][0] for r in rows]), (name, table)
        for key in ("by_rule", "sealed", "partition_pairs"):
            assert nondecreasing([r[key] for r in rows]), (name, key)
        assert nondecreasing([r["funnel"][1] for r in rows]), name
        assert len({r["rows"]["pairs"][0] for r in rows}) > 3  # it saw the pairs arrive
    trainer = runs["trainer"]
    assert all(r["pairs"] == r["distinct"] and r["short"] == [] for r in trainer)
    for key in ("sealed", "pairs"):
        assert nondecreasing([r[key] for r in trainer]), key
    assert len({r["sealed"] for r in trainer}) > 2  # partitions were sealed while it read

    # the end state: exactly what one flush of the same records writes, and no garbage left
    reference = Settings(data_dir=tmp_path / "reference", partitions=2, metrics_port=0)
    init_data_dir(reference.data_dir)
    replay(reference, traffic_records(N_EVENTS, 2), final_tick_ms=ARRIVAL_MS + 10**9)
    for table in TABLES:
        got = read_table(data_dir=data_dir, table=table).to_pylist()
        assert canonical(got) == canonical(
            read_table(data_dir=reference.data_dir, table=table).to_pylist()), table
    for name, (_, out) in readers.items():
        last = results(out)[-1]
        if name == "trainer":
            assert last["pairs"] == len(read_table(data_dir=data_dir, table="pairs"))
        else:
            assert {t: n for t, (n, _) in last["rows"].items()} == {
                t: len(read_table(data_dir=data_dir, table=t)) for t in TABLES}
    assert [(r.partition, r.sha256) for r in sealed_partitions(data_dir)] == [
        (r.partition, r.sha256) for r in sealed_partitions(reference.data_dir)]
    for folder in data_dir.glob("*/*"):  # one generation per partition; sealed: one file
        if folder.parent.name in TABLES and folder.name != "_schema":
            [generation] = [p for p in folder.iterdir() if p.name != CURRENT]
            assert (folder / CURRENT).resolve() == generation
            if folder.parent.name in SEALED_TABLES:
                assert len(list(generation.iterdir())) == 1, generation
