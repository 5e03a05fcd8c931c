"""The built wheel installs one top-level import name, ``prefstream``, and its console script runs.

The product's folders (``streams/``, ``schemas/``, ``storage/``, ``trainer/``) sit at the
repository root and install as ``prefstream.streams`` and so on (pyproject's
``[tool.setuptools.package-dir]``): nothing named ``streams`` or ``storage`` lands in
site-packages. The wheel goes into a fresh venv without its dependencies, which that venv borrows
from this interpreter's site-packages through a ``.pth`` line (offline, seconds)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # builds and installs a wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of what the Dockerfile copies, so no stale ``build/`` folder of the
    checkout can slip old files in."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for name in ("pyproject.toml", pyproject["project"]["readme"]):
        shutil.copy(ROOT / name, source / name)
    folders = {f.split("/")[0] for f in pyproject["tool"]["setuptools"]["package-dir"].values()}
    for folder in folders:
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--wheel-dir", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [built] = out.glob("prefstream-*.whl")
    return built


def _top_level_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = set(archive.read(top_level).decode().split())
    roots = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    return declared | roots


def test_the_wheel_has_one_top_level_name(wheel: Path) -> None:
    assert _top_level_names(wheel) == {"prefstream"}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for package in ("streams", "schemas", "storage", "trainer"):
        assert f"prefstream/{package}/__init__.py" in names, package


def test_the_installed_wheel_runs_its_console_script(wheel: Path, tmp_path: Path) -> None:
    # nothing of the checkout may leak in: no PYTHONPATH (its prefstream.egg-info would read as
    # installed), and every command runs away from it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120, env=env, cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"], env=env,
                                  cwd=tmp_path, capture_output=True, text=True,
                                  check=True).stdout.strip())
    # the dependencies (torch, faust, ...) come from this interpreter's site-packages; a .pth
    # path line adds the folder without running its .pth files (so not this checkout's editable
    # install)
    deps = sysconfig.get_paths()["purelib"]
    (purelib / "deps.pth").write_text(deps + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                           "--no-deps", "--no-index", "-q", str(wheel)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    installed = {p.name for p in purelib.iterdir() if not p.name.endswith((".dist-info", ".pth"))}
    assert installed - {"__pycache__"} == {"prefstream"}
    # run away from the checkout, so its folders cannot shadow the installed package
    where = subprocess.run([str(python), "-c", "import prefstream.streams.core.pairing as m, "
                            "importlib.util as u; print(m.__file__); "
                            "print(u.find_spec('streams'), u.find_spec('storage'))"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    module, specs = where.stdout.splitlines()
    assert Path(module).is_relative_to(purelib), module
    assert specs == "None None"
    help_ = subprocess.run([str(venv / "bin" / "prefstream"), "--help"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0, help_.stderr[-3000:]
    assert "usage: prefstream" in help_.stdout and "worker" in help_.stdout
