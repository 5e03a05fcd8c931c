"""Real TLS material and a TLS Kafka listener for tests.

The embedded broker (Tansu) speaks PLAINTEXT only, so :class:`TlsBroker` puts a TLS-terminating
proxy in front of it: Tansu advertises the proxy's address, so every connection a client makes
(bootstrap and each broker) is TLS with a client certificate, checked against a private CA made
here with the ``openssl`` command line.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

from prefstream.streams.broker import free_port, tansu_binary, wait_for_port


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path  # encrypted with key_password
    key_password: str
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN=prefstream test {name}")
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], ext: str,
          password: str | None) -> tuple[Path, Path]:
    cert, key, csr = (folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr")
    secret = ["-passout", f"pass:{password}"] if password else ["-nodes"]
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", *secret,
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    (folder / f"{name}.ext").write_text(ext + "\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", "2",
             "-extfile", str(folder / f"{name}.ext"))
    return cert, key


def make_pki(folder: Path, key_password: str) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate with an encrypted key."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    server = _leaf(folder, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost", None)
    client = _leaf(folder, "client", ca, "extendedKeyUsage=clientAuth", key_password)
    other, _ = _ca(folder, "other-ca")
    return Pki(ca[0], server[0], server[1], client[0], client[1], key_password, other)


def server_context(pki: Pki) -> ssl.SSLContext:
    """The listener's side: its certificate, and a client certificate required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class TlsBroker:
    """``with TlsBroker(pki) as b: b.bootstrap`` -- Tansu reachable only through TLS."""

    def __init__(self, pki: Pki, log_path: Path | None = None) -> None:
        self.port, self._plain_port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.handshakes = 0  # TLS connections accepted (client certificate verified)
        self._context = server_context(pki)
        self._log_path = log_path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> TlsBroker:
        url = f"tcp://127.0.0.1:{self._plain_port}"
        out = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url",
             f"tcp://{self.bootstrap}", "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self._plain_port, timeout_s=20)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            self._relay, "127.0.0.1", self.port, ssl=self._context), self._loop).result(10)
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._plain_port)
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
