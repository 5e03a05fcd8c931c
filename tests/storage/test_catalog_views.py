"""Every catalog view is registered explicitly by ``storage.catalog``: a process that imports
only storage (no trainer, no command module) writes a catalog with all of them."""

from __future__ import annotations

import json
import subprocess
import sys

from prefstream.storage.tables import TABLES

ONLY_STORAGE = """
import json, sys, tempfile
from pathlib import Path
import duckdb
from prefstream.storage.catalog import CATALOG_NAME, ensure_catalog
from prefstream.storage.files import init_data_dir
data_dir = Path(tempfile.mkdtemp())
init_data_dir(data_dir)
assert ensure_catalog(data_dir)
con = duckdb.connect(str(data_dir / CATALOG_NAME), read_only=True)
views = sorted(r[0] for r in con.execute("SELECT view_name FROM duckdb_views() "
                                         "WHERE NOT internal").fetchall())
loaded = sorted(m for m in sys.modules if m.startswith("prefstream.")
                and m.split(".")[1] in ("trainer", "report", "status", "evaluate", "cli"))
print(json.dumps({"views": views, "loaded": loaded}))
"""


def test_a_process_importing_only_storage_writes_every_view() -> None:
    done = subprocess.run([sys.executable, "-c", ONLY_STORAGE], capture_output=True, text=True,
                          timeout=120, check=True)
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["loaded"] == []
    assert out["views"] == sorted([*TABLES, "partitions", "funnel", "comparisons", "models"])
