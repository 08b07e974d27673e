"""Fixtures that start what the tests talk to: real `gochat serve` processes on 127.0.0.1.

A server is ready when it logs its listening line (an event, not a sleep); its port is read
from that line, so the chat port is 0 (the kernel picks) and nothing races for it.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gevent import socket as gsocket

LISTENING = re.compile(r"gochat listening on ([\d.]+):(\d+) \(admin (?:[\d.]+:(\d+)|off)")
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `gochat serve` process; its log lines are collected by a thread for assertions."""

    def __init__(self, args: list[str] | None = None, preexec_fn: Callable[[], None] | None = None,
                 **settings: Any) -> None:
        env = dict(os.environ)
        env.pop("GOCHAT_CONFIG", None)
        for key, value in settings.items():
            env["GOCHAT_" + key.upper()] = str(value)
        admin_port = settings.get("admin_port", free_port())
        argv = [sys.executable, "-m", "gochat", "serve", "--host", "127.0.0.1", "--port", "0",
                "--admin-port", str(admin_port), "--log-level", "info", *(args or [])]
        self.proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, bufsize=1, preexec_fn=preexec_fn)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._new_line = threading.Condition()
        self.port = self.admin_port = 0
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT) or not self.port:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-30:]))

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
            match = LISTENING.search(line)
            if match:
                self.port = int(match.group(2))
                self.admin_port = int(match.group(3) or 0)
                self._ready.set()
        self._ready.set()  # the process ended: wake a waiting start

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """The first log line matching ``pattern``, waiting for it to be written."""
        regex = re.compile(pattern)
        with self._new_line:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                if not self._new_line.wait(timeout):
                    raise AssertionError(f"no log line matching {pattern!r}; last: {self.lines[-5:]}")

    def admin(self, path: str) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        ctype_json = body[:1] in (b"{", b"[")
        return status, json.loads(body) if ctype_json else body.decode()

    def stats(self) -> dict:
        return self.admin("/stats")[1]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)


class RedisServer:
    """A private redis-server on a free port, with append-only persistence in a temp dir."""

    def __init__(self, directory: str, port: int | None = None) -> None:
        self.dir, self.port = directory, port or free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:  # the server says when it is ready: wait for that line
            if "Ready to accept connections" in line:
                return
        raise RuntimeError("redis-server did not start")

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signum)
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(str(tmp_path))
    yield server
    server.stop(signal.SIGKILL)


INSTALL_TIMEOUT = 480  # seconds for each of apt-get update and apt-get install


def ensure_tool(names: tuple[str, ...], package: str) -> str:
    """The path of a Debian-packaged tool, installing the package (as root) when it is missing."""
    def find() -> str | None:
        return next((p for p in map(shutil.which, names) if p), None)

    path = find()
    if path:
        return path
    why = f"{names[0]} is not installed (Debian package {package!r}: apt-get install -y {package})"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"{why}; not root, so the test cannot install it", pytrace=False)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=INSTALL_TIMEOUT, capture_output=True)
        done = subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, timeout=INSTALL_TIMEOUT,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{why}; apt-get install timed out", pytrace=False)
    path = find()
    if not path:
        pytest.fail(f"{why}; apt-get install failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}", pytrace=False)
    return path


@pytest.fixture
def start_server() -> Iterator:
    """Start servers with GOCHAT_* settings; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def start(args: list[str] | None = None, **settings: Any) -> ServerProcess:
        server = ServerProcess(args, **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """One server shared by a module's tests, with limits high enough not to interfere."""
    proc = ServerProcess(rate=100000, burst=100000)
    yield proc
    proc.stop()


class RawClient:
    """Bytes over a plain socket, for what the client library would never send.

    The socket is gevent's, so a test blocked reading it still lets the client library's
    reader greenlets run (answer pings, collect messages).
    """

    def __init__(self, port: int, codec: str = "json", timeout: float = 5.0) -> None:
        self.sock = gsocket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.codec = codec
        self.buf = b""
        if codec == "frames":
            self.sock.sendall(b"GCF1")

    def send(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        if self.codec == "frames":
            data = struct.pack(">II", len(data), zlib.crc32(data)) + data
        else:
            data += b"\n"
        self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, timeout: float = 5.0) -> dict | str:
        """The next message (json, frames) or line (text)."""
        self.sock.settimeout(timeout)
        while True:
            if self.codec == "frames" and len(self.buf) >= 8:
                n, crc = struct.unpack(">II", self.buf[:8])
                if len(self.buf) >= 8 + n:
                    payload, self.buf = self.buf[8:8 + n], self.buf[8 + n:]
                    assert zlib.crc32(payload) == crc
                    return json.loads(payload)
            elif self.codec != "frames" and b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                return json.loads(line) if self.codec == "json" else line.decode()
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by server")
            self.buf += chunk

    def expect(self, type_: str, timeout: float = 5.0, **fields: Any) -> dict:
        while True:
            message = self.read(timeout)
            if message.get("type") == type_ and all(message.get(k) == v for k, v in fields.items()):
                return message

    def expect_line(self, fragment: str, timeout: float = 5.0) -> str:
        while True:
            line = self.read(timeout)
            if fragment in line:
                return line

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server closes; what arrives before that is read and dropped."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except socket.timeout:
            return False
        except OSError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw() -> Iterator:
    opened: list[RawClient] = []

    def connect(port: int, codec: str = "json") -> RawClient:
        client = RawClient(port, codec)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


@pytest.fixture
def chat() -> Iterator:
    """gochat.client.Client factory: ``chat(port, nick, room=None, codec="json")``."""
    from gochat.client import Client

    opened: list[Client] = []

    def connect(port: int, nick: str | None = None, room: str | None = None, codec: str = "json") -> Client:
        client = Client("127.0.0.1", port, codec=codec)
        opened.append(client)
        if nick:
            client.hello(nick=nick)
        if room:
            client.join(room)
        return client

    yield connect
    for client in opened:
        client.close()


def make_certificate(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 with a fresh key: (cert file, key file) in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.fixture
def certificate(tmp_path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1: (cert file, key file), for the TLS tests."""
    return make_certificate(tmp_path)
