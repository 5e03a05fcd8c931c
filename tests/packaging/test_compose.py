"""docker-compose.yml and the Dockerfile, checked against the code they run (no Docker here).

Every service command parses with the real CLI parser, every PREFSTREAM_* variable is a field of
``Settings`` or ``TrainConfig`` and its value validates, every ``${VAR}`` is either required
(``${VAR:?message}``) or defaulted, volumes are declared, services wait for healthy dependencies,
the worker can be scaled, and the image installs every package and runs the console script.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from prefstream.cli import build_parser
from prefstream.settings import Settings
from prefstream.settings_doc import all_variables
from prefstream.streams import metrics
from prefstream.streams.broker import free_port
from prefstream.trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_SERVICES = ("worker", "trainer")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's substitution: the variable, else its default, else an error for ``:?``."""
    def sub(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"] or "", m["arg"] or ""
        if env.get(name):
            return env[name]
        if op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg
    return INTERPOLATION.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def service_env(service: str, env: dict[str, str]) -> dict[str, str]:
    raw = SERVICES[service].get("environment", {})
    assert isinstance(raw, dict), f"{service}: write environment as a mapping"
    return {k: interpolate(str(v), env) for k, v in raw.items()}


def volume_mounts(service: str, env: dict[str, str]) -> dict[str, str]:
    """target -> source of a service's short-syntax volumes."""
    mounts = {}
    for spec in SERVICES[service].get("volumes", []):
        source, target, *_ = interpolate(spec, env).split(":")
        mounts[target] = source
    return mounts


def required_variables() -> dict[str, str]:
    return {m["name"]: m["arg"] for m in INTERPOLATION.finditer(COMPOSE_TEXT)
            if (m["op"] or "").endswith("?")}


REQUIRED = {name: "/srv/labels" for name in required_variables()}


# --- services and commands -------------------------------------------------------------------

def test_the_three_services_exist() -> None:
    assert set(SERVICES) == {"kafka", "worker", "trainer"}
    assert COMPOSE["name"] == "prefstream"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_services_build_from_the_dockerfile_and_parse_with_the_cli(service: str) -> None:
    spec = SERVICES[service]
    assert spec["build"] == "." and "image" not in spec
    command = spec["command"]
    assert isinstance(command, list), "exec form: no shell between compose and prefstream"
    args = build_parser().parse_args(command)
    assert args.command == command[0]


def test_readme_compose_commands_parse_with_the_cli() -> None:
    """``docker compose exec <svc> prefstream ...`` and ``docker compose run ... <svc> ...``."""
    section = README.split("## Deployment (docker compose)", 1)[1].split("\n## ", 1)[0]
    found = 0
    for line in section.splitlines():
        words = shlex.split(line.split("  #", 1)[0]) if line.startswith("docker compose ") else []
        if words[2:3] not in (["exec"], ["run"]):
            continue
        rest = words[3:]
        while rest[0].startswith("-"):  # compose's own options (none of ours take a value)
            rest.pop(0)
        service, *args = rest
        assert service in SERVICES, line
        if words[2] == "exec":  # exec runs a command line: no entry point
            assert args[0] == "prefstream", line
            args = args[1:]
        else:
            assert service in APP_SERVICES, line  # the image's entry point is prefstream
        build_parser().parse_args(args)
        found += 1
    assert found >= 2


# --- variables -------------------------------------------------------------------------------

def test_every_interpolation_is_required_or_defaulted() -> None:
    assert re.findall(r"\$(?!\{|\$)\w+", COMPOSE_TEXT) == [], "write ${VAR...}, not $VAR"
    for m in INTERPOLATION.finditer(COMPOSE_TEXT):
        op, arg = m["op"], (m["arg"] or "").strip()
        assert op in (":?", ":-"), f"{m[0]}: use ${{VAR:?message}} or ${{VAR:-default}}"
        if op == ":?":
            assert len(arg) > 20, f"{m[0]}: say what to set and why"


def test_required_variables_stop_compose_and_are_in_the_readme() -> None:
    required = required_variables()
    assert set(required) == {"LABELS_DIR"}
    with pytest.raises(KeyError, match="LABELS_DIR: set LABELS_DIR"):
        volume_mounts("trainer", {})
    for name in required:
        assert f"{name}=" in README


def test_host_variables_named_prefstream_are_settings() -> None:
    """A host ${PREFSTREAM_X} must mean what PREFSTREAM_X means to the code."""
    known = all_variables()
    for m in INTERPOLATION.finditer(COMPOSE_TEXT):
        if m["name"].startswith("PREFSTREAM_"):
            assert m["name"] in known, m["name"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_prefstream_variables_are_fields_and_valid(
        service: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = service_env(service, REQUIRED)
    known = all_variables()
    ours = {k: v for k, v in env.items() if k.startswith("PREFSTREAM_")}
    assert set(env) == set(ours), "only prefstream variables in app services"
    for name in ours:
        assert name in known, f"{service}: {name} is no Settings / TrainConfig field"
    for name in list(os.environ):
        if name.startswith("PREFSTREAM_"):
            monkeypatch.delenv(name)
    labels = ours.pop("PREFSTREAM_TRAIN_EXPLICIT_LABELS", None)
    if labels is not None:  # a path inside the labels mount; validated against a real file
        assert Path(labels).parent == Path("/labels")
        assert "/labels" in volume_mounts(service, REQUIRED)
        (tmp_path / "labels.jsonl").write_text("")
        ours["PREFSTREAM_TRAIN_EXPLICIT_LABELS"] = str(tmp_path / "labels.jsonl")
    for name, value in ours.items():
        monkeypatch.setenv(name, value)
    settings, config = Settings(), TrainConfig()
    assert settings.partitions == int(env.get("PREFSTREAM_PARTITIONS", settings.partitions))
    if service == "trainer":
        assert config.explicit_labels == tmp_path / "labels.jsonl"


def test_partitions_default_leaves_room_for_the_readme_scale() -> None:
    workers = int(re.search(r"--scale worker=(\d+)", COMPOSE_TEXT)[1])
    assert int(service_env("worker", {})["PREFSTREAM_PARTITIONS"]) >= workers


# --- volumes, data dir, dependencies ---------------------------------------------------------

def test_named_volumes_are_declared_and_the_data_volume_is_shared() -> None:
    declared = set(COMPOSE["volumes"])
    used = set()
    for service in SERVICES:
        for target, source in volume_mounts(service, REQUIRED).items():
            assert target.startswith("/")
            if not source.startswith(("/", ".")):
                used.add(source)
    assert used == declared
    data = {volume_mounts(s, REQUIRED)["/data"] for s in APP_SERVICES}
    assert data == {"prefstream-data"}
    assert service_env("worker", {})["PREFSTREAM_DATA_DIR"] == "/data"
    trainer_args = build_parser().parse_args(SERVICES["trainer"]["command"])
    assert str(trainer_args.data_dir) == "/data"
    assert volume_mounts("trainer", REQUIRED)["/labels"] == "/srv/labels"
    assert SERVICES["trainer"]["volumes"][-1].endswith(":/labels:ro")


def test_kafka_keeps_its_log_on_a_volume() -> None:
    env = SERVICES["kafka"]["environment"]
    assert volume_mounts("kafka", {})[env["KAFKA_LOG_DIRS"]] == "kafka-data"


def test_services_wait_for_healthy_dependencies() -> None:
    for name, spec in SERVICES.items():
        for dep, cond in spec.get("depends_on", {}).items():
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}"
            assert "healthcheck" in SERVICES[dep], dep
    assert "kafka" in SERVICES["worker"]["depends_on"]
    assert "worker" in SERVICES["trainer"]["depends_on"]
    for name in APP_SERVICES:
        assert SERVICES[name]["restart"] == "on-failure"


def test_the_worker_can_be_scaled() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    [command] = [line.lstrip("# ") for line in COMPOSE_TEXT.splitlines()
                 if line.startswith("#") and "docker compose up" in line]
    assert "--scale worker=3" in command
    assert f"\n{command}\n" in README, "README and the compose file give the same command"


# --- kafka -----------------------------------------------------------------------------------

def test_kafka_is_a_single_node_kraft_apache_kafka() -> None:
    kafka = SERVICES["kafka"]
    env = kafka["environment"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16  # kafka-storage format
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert env[key] == 1
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def _listeners(value: str) -> dict[str, str]:
    return dict(item.split("://") for item in value.split(","))


def test_listeners_match_the_bootstrap_the_healthcheck_and_the_host_port() -> None:
    env = SERVICES["kafka"]["environment"]
    listeners, advertised = _listeners(env["KAFKA_LISTENERS"]), \
        _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = _listeners(env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].replace(":", "://"))
    assert set(listeners) == set(protocols) and set(advertised) <= set(listeners)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    for name, address in advertised.items():
        assert listeners[name].rsplit(":", 1)[1] == address.rsplit(":", 1)[1], name
    bootstrap = service_env("worker", {})["PREFSTREAM_KAFKA_BOOTSTRAP"]
    assert bootstrap == advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    assert bootstrap.startswith("kafka:")
    host = advertised["PLAINTEXT_HOST"]
    assert SERVICES["kafka"]["ports"] == [f"127.0.0.1:{host.split(':')[1]}:{host.split(':')[1]}"]
    assert f"--bootstrap-server {host}" in SERVICES["kafka"]["healthcheck"]["test"][1]
    assert f'FeedbackProducer("{host}"' in README  # the README's producer runs unchanged


def test_healthchecks_have_timing() -> None:
    for name in ("kafka", "worker"):
        check = SERVICES[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL")
        assert {"interval", "timeout", "retries", "start_period"} <= set(check)


def test_worker_healthcheck_probes_its_metrics_endpoint() -> None:
    """Run the healthcheck's Python against a real metrics server on the port it names."""
    test = SERVICES["worker"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    port = int(re.search(r"127\.0\.0\.1:(\d+)/metrics", test[3])[1])
    env = service_env("worker", {})
    assert port == int(env.get("PREFSTREAM_METRICS_PORT", Settings.model_fields[
        "metrics_port"].default))
    assert env["PREFSTREAM_METRICS_HOST"] == "0.0.0.0"
    code = test[3].replace(f":{port}/", ":{port}/")
    free = free_port()
    assert subprocess.run([sys.executable, "-c", code.format(port=free)],
                          capture_output=True, timeout=30).returncode != 0  # nobody serving
    server = metrics.serve(lambda: "up 1\n", host="127.0.0.1", port=free)
    assert server is not None
    try:
        done = subprocess.run([sys.executable, "-c", code.format(port=free)],
                              capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr
    finally:
        server.shutdown()


# --- Dockerfile ------------------------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    folders = PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    packages = {folder.split("/")[0] for folder in folders}
    copies = [rest.split() for word, rest in _instructions() if word == "COPY"]
    copied = {src.rstrip("/") for *sources, _ in copies for src in sources}
    assert packages <= copied, packages - copied
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    for package in packages:
        assert (ROOT / package / "__init__.py").exists(), package
    runs = [rest for word, rest in _instructions() if word == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch" in r)
    project = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert "download.pytorch.org/whl/cpu" in runs[torch] and torch < project


def test_dockerfile_runs_the_console_script_as_a_user_owning_data() -> None:
    inst = _instructions()
    [(_, entrypoint)] = [i for i in inst if i[0] == "ENTRYPOINT"]
    scripts = PYPROJECT["project"]["scripts"]
    assert yaml.safe_load(entrypoint) == ["prefstream"] and "prefstream" in scripts
    [(_, user)] = [i for i in inst if i[0] == "USER"]
    assert user != "root"
    assert any(w == "RUN" and "chown" in r and "/data" in r for w, r in inst)
    assert inst[0][0] == "FROM" and "python:3.1" in inst[0][1]
    python = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    image = re.search(r"python:(\d+\.\d+)", inst[0][1])[1]
    assert tuple(map(int, image.split("."))) >= tuple(map(int, python.split(".")))
