"""The Go examples and their gevent twins behave the same, byte for byte.

Each pair (examples/go/NAME and examples/NAME.py) runs as real processes on 127.0.0.1, port
0, and is driven by the same scripted client below; the test compares what the clients
received and what the server printed on stdout. Go comes from PATH, or Debian's
``golang-go``, installed here when missing; the Go programs are built once per session.

Synchronisation is by events only: a reply on a socket, or a line the server printed
(``server.out.wait_for``). The heartbeat pair is the one place where time is the subject:
its margins are half a ping interval (150 ms) on both sides.
"""
from __future__ import annotations

import difflib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GO_DIRS = {  # pair name -> directory under examples/go
    "echo": "echo", "client": "client", "broadcaster": "chat", "semaphore": "semaphore",
    "heartbeat": "heartbeat", "shutdown": "shutdown", "syncpool": "syncpool", "recover": "recover",
}
LANGS = ("go", "py")
LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")
STEP_TIMEOUT = 5.0  # seconds any single step may take
BUILD_TIMEOUT = 300.0
APT_TIMEOUT = 300.0

# The first test may install Go (apt-get) and build every example: more than pytest.ini's
# default per-test timeout on a fresh machine. Each step below has its own short timeout.
pytestmark = pytest.mark.timeout(900)


# ------------------------------------------------------------------ Go toolchain


def find_go() -> str | None:
    return shutil.which("go") or next((p for p in ("/usr/lib/go/bin/go", "/usr/local/go/bin/go")
                                       if os.access(p, os.X_OK)), None)


@pytest.fixture(scope="session")
def go_tool() -> str:
    """The go command; Debian's golang-go is installed when there is none (fails, never skips)."""
    go = find_go()
    if go is None:
        errors = []
        for argv in (["apt-get", "install", "-y", "golang-go"], ["apt-get", "update"],
                     ["apt-get", "install", "-y", "golang-go"]):
            try:
                run = subprocess.run(argv, capture_output=True, text=True, timeout=APT_TIMEOUT,
                                     env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{' '.join(argv)}: {exc}")
                continue
            if run.returncode and argv[1] == "install":
                errors.append(f"{' '.join(argv)} exited {run.returncode}: {run.stderr.strip()[-500:]}")
            go = find_go()
            if go is not None:
                break
        if go is None:
            pytest.fail("the Go toolchain is needed to compare examples/go with examples/*.py and could not be "
                        "installed (`apt-get install -y golang-go`):\n" + "\n".join(errors), pytrace=False)
    return go


@pytest.fixture(scope="session")
def go_bin(go_tool: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every Go example, built once into a temporary directory (in parallel)."""
    out = tmp_path_factory.mktemp("go-examples")
    env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0", "GOWORK": "off"}
    if "GOCACHE" not in env and "HOME" not in env and "XDG_CACHE_HOME" not in env:
        env["GOCACHE"] = str(tmp_path_factory.mktemp("go-cache"))
    builds = {name: subprocess.Popen([go_tool, "build", "-o", str(out / name), "."], cwd=EXAMPLES / "go" / d,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for name, d in GO_DIRS.items()}
    failures = []
    for name, proc in builds.items():
        try:
            output, _ = proc.communicate(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if proc.returncode:
            failures.append(f"examples/go/{GO_DIRS[name]}: {output}")
    if failures:
        pytest.fail("go build failed:\n" + "\n".join(failures), pytrace=False)
    return {name: out / name for name in GO_DIRS}


def argv_for(lang: str, name: str, go_bin: dict[str, Path], *args: str) -> list[str]:
    if lang == "go":
        return [str(go_bin[name]), *args]
    return [sys.executable, str(EXAMPLES / f"{name}.py"), *args]


# ------------------------------------------------------------------ processes


class LineLog:
    """The lines of one output stream of a child, collected by a thread as they come."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = STEP_TIMEOUT) -> re.Match:
        regex = re.compile(pattern)
        with self._cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self._eof or not self._cond.wait(timeout):
                    raise AssertionError(f"no line matching {pattern!r}; got {self.lines}")

    def join(self) -> None:
        self._thread.join(STEP_TIMEOUT)


class Server:
    """One example server process we started; ``stop`` kills it (by its Popen handle) if still running."""

    def __init__(self, argv: list[str], listen_on: str = "stdout") -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1, cwd=ROOT)
        self.out = LineLog(self.proc.stdout)
        self.err = LineLog(self.proc.stderr)
        try:
            match = (self.err if listen_on == "stderr" else self.out).wait_for(LISTENING.pattern, 20)
        except AssertionError:
            self.stop()
            raise AssertionError(f"{argv} did not start: {self.err.lines[-20:]}") from None
        self.port = int(match.group(2))

    def transcript(self) -> list[str]:
        """What it printed on stdout after its listening line (the stream is complete once stopped)."""
        return [line for line in self.out.lines if not LISTENING.search(line)]

    def wait(self, timeout: float = STEP_TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        self.out.join()
        self.err.join()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(argv: list[str], listen_on: str = "stdout") -> Server:
        server = Server(argv, listen_on)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class LineClient:
    """A scripted client: every line it sends and receives goes into the shared transcript."""

    def __init__(self, name: str, port: int, transcript: list[str]) -> None:
        self.name = name
        self.transcript = transcript
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT)
        self.buf = b""

    def send(self, line: str) -> None:
        self.transcript.append(f"{self.name}> {line}")
        self.sock.sendall(line.encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are (several lines, a missing newline): shown as a Python literal."""
        self.transcript.append(f"{self.name}> {data.decode()!r}")
        self.sock.sendall(data)

    def read(self) -> str:
        """The next line, or "<EOF>" once the server has closed."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                line = "<EOF>" if not self.buf else f"<EOF after {self.buf!r}>"
                self.transcript.append(f"{self.name}< {line}")
                return line
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\n", 1)
        line = raw.decode()
        shown = line if len(line) <= 80 else f"<{len(raw)} bytes: {line[:20]}...>"
        self.transcript.append(f"{self.name}< {shown}")
        return line

    def say(self, line: str) -> str:
        self.send(line)
        return self.read()

    def close(self) -> None:
        self.sock.close()


def serve_and_drive(servers, argv: list[str], script: Callable[[Server, Callable[[str], LineClient]], None],
                    listen_on: str = "stdout", stop: bool = True) -> tuple[list[str], Server]:
    """Start a server, run the script against it; the client transcript and the server."""
    server = servers(argv, listen_on)
    transcript: list[str] = []
    clients: list[LineClient] = []

    def connect(name: str) -> LineClient:
        client = LineClient(name, server.port, transcript)
        clients.append(client)
        return client

    try:
        script(server, connect)
    finally:
        for client in clients:
            client.close()
        if stop:
            server.stop()
    return transcript, server


def run_both(servers, go_bin, name: str, script, *args: str, listen_on: str = "stdout") -> dict[str, list[str]]:
    """The transcript of each language: the clients' lines, then what the server printed."""
    results = {}
    for lang in LANGS:
        transcript, server = serve_and_drive(servers, argv_for(lang, name, go_bin, "-addr", "127.0.0.1:0", *args),
                                             script, listen_on)
        results[lang] = transcript + ["--- server stdout ---"] + server.transcript()
    return results


def assert_transcripts(results: dict[str, list[str]], expected: list[str]) -> None:
    """Both languages gave the expected transcript; otherwise a diff per language."""
    diffs = []
    for lang, got in results.items():
        if got != expected:
            diff = "\n".join(difflib.unified_diff(expected, got, "expected", lang, lineterm=""))
            diffs.append(diff)
    assert not diffs, "\n\n".join(diffs)


# ------------------------------------------------------------------ the pairs


def test_echo(servers, go_bin):
    def script(server: Server, connect) -> None:
        a = connect("A")
        a.say("hello")
        b = connect("B")
        b.say("from b")
        a.say("again")
        a.close()
        server.out.wait_for("conn 1: closed")
        b.send_raw(b"one\ntwo\nthree\n")  # one write, three lines: bufio splits them
        for _ in range(3):
            b.read()
        b.say("still here")
        b.close()
        server.out.wait_for("conn 2: closed")

    assert_transcripts(run_both(servers, go_bin, "echo", script), [
        "A> hello", "A< hello",
        "B> from b", "B< from b",
        "A> again", "A< again",
        "B> 'one\\ntwo\\nthree\\n'", "B< one", "B< two", "B< three",
        "B> still here", "B< still here",
        "--- server stdout ---",
        "conn 1: open", "conn 1: hello", "conn 2: open", "conn 2: from b", "conn 1: again", "conn 1: closed",
        "conn 2: one", "conn 2: two", "conn 2: three", "conn 2: still here", "conn 2: closed",
    ])


class ScriptedServer:
    """The test's side of the client pair: answers each line in upper case, ``limit`` lines at most."""

    def __init__(self, limit: int | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[str] = []
        self.limit = limit
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(STEP_TIMEOUT * 2)
        conn, _ = self.sock.accept()
        conn.settimeout(STEP_TIMEOUT)
        with conn, conn.makefile("rb") as r:
            for line in r:
                self.received.append(line.decode())
                if self.limit is not None and len(self.received) > self.limit:
                    return
                conn.sendall(line.upper())

    def close(self) -> list[str]:
        self.thread.join(STEP_TIMEOUT * 2)
        self.sock.close()
        return self.received


@pytest.mark.parametrize("args, limit, expected_code, expected", [
    (["hello", "world"], None, 0, ["connected", "> hello", "< HELLO", "> world", "< WORLD", "done"]),
    ([], None, 0, ["connected", "> hello", "< HELLO", "> gochat", "< GOCHAT", "> bye", "< BYE", "done"]),
    (["one", "two", "three"], 1, 1, ["connected", "> one", "< ONE", "> two", "server closed"]),
], ids=["args", "default-script", "server-closes"])
def test_client(go_bin, args, limit, expected_code, expected):
    results = {}
    for lang in LANGS:
        server = ScriptedServer(limit)
        run = subprocess.run(argv_for(lang, "client", go_bin, "-addr", f"127.0.0.1:{server.port}", *args),
                             capture_output=True, text=True, timeout=20, cwd=ROOT)
        received = server.close()
        results[lang] = (run.returncode, run.stdout.splitlines(), received)
    sent = [line + "\n" for line in (args or ["hello", "gochat", "bye"])]
    if limit is not None:
        sent = sent[:limit + 1]
    assert results == dict.fromkeys(LANGS, (expected_code, expected, sent))


def test_client_cannot_connect(go_bin):
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        codes = {lang: subprocess.run(argv_for(lang, "client", go_bin, "-addr", f"127.0.0.1:{port}"),
                                      capture_output=True, text=True, timeout=20, cwd=ROOT)
                 for lang in LANGS}
    assert {lang: (run.returncode, run.stdout, run.stderr.startswith("dial: ")) for lang, run in codes.items()} == \
        dict.fromkeys(LANGS, (1, "", True))


def test_broadcaster(servers, go_bin):
    """examples/go/chat (the reference gochat mirrors) against examples/broadcaster.py."""
    logs = {}

    def script(server: Server, connect) -> None:
        a = connect("A")
        a.say("a: hi")  # its own line back: A is registered
        b = connect("B")
        b.say("b: hi")
        a.read()
        c = connect("C")
        c.send_raw(b"c: crlf\r\n")  # the scanner drops the \r
        c.read(), a.read(), b.read()
        a.close()
        b.send("b: after a left")
        b.read(), c.read()
        c.send_raw(b"c: no newline")  # the last line, without "\n", still counts
        c.sock.shutdown(socket.SHUT_WR)
        b.read(), c.read()
        c.read()  # then C is unregistered, its queue closed, its socket closed
        server.proc.send_signal(signal.SIGTERM)
        logs[server] = (server.wait(), [line.split(" ", 2)[2] for line in server.err.lines])

    results = {}
    for lang in LANGS:
        transcript, server = serve_and_drive(servers, argv_for(lang, "broadcaster", go_bin, "-addr", "127.0.0.1:0"),
                                             script, listen_on="stderr")
        code, log = logs[server]
        results[lang] = transcript + [f"exit {code}"] + [re.sub(r":\d+$", ":PORT", line) for line in log]
    assert_transcripts(results, [
        "A> a: hi", "A< a: hi",
        "B> b: hi", "B< b: hi", "A< b: hi",
        "C> 'c: crlf\\r\\n'", "C< c: crlf", "A< c: crlf", "B< c: crlf",
        "B> b: after a left", "B< b: after a left", "C< b: after a left",
        "C> 'c: no newline'", "B< c: no newline", "C< c: no newline", "C< <EOF>",
        "exit 0", "chat: listening on 127.0.0.1:PORT", "chat: shutting down",
    ])


def test_semaphore(servers, go_bin):
    def script(server: Server, connect) -> None:
        a = connect("A")
        a.read()
        a.say("a")
        b = connect("B")
        b.read()
        c = connect("C")  # both slots taken: refused at once
        c.read(), c.read()
        a.close()
        server.out.wait_for("conn 1: released")
        d = connect("D")  # A's slot
        d.read()
        d.say("d")
        b.say("b")
        for client, conn_id in ((b, 2), (d, 4)):
            client.close()
            server.out.wait_for(f"conn {conn_id}: released")

    assert_transcripts(run_both(servers, go_bin, "semaphore", script, "-max", "2"), [
        "A< welcome 1", "A> a", "A< a",
        "B< welcome 2",
        "C< busy", "C< <EOF>",
        "D< welcome 4", "D> d", "D< d",
        "B> b", "B< b",
        "--- server stdout ---",
        "conn 1: serving", "conn 2: serving", "conn 3: busy", "conn 1: released", "conn 4: serving",
        "conn 2: released", "conn 4: released",
    ])


def test_heartbeat(servers, go_bin):
    """Pings every 300 ms; closed after 450 ms of silence. A answers two pings, then not the third."""

    def script(server: Server, connect) -> None:
        a = connect("A")
        for _ in range(2):
            a.read()
            a.send("pong")
        a.read()
        a.read()  # "timeout": 450 ms after the second pong, 150 ms after the third ping
        a.read()
        server.out.wait_for("conn 1: closed")

    assert_transcripts(run_both(servers, go_bin, "heartbeat", script, "-ping", "300ms", "-wait", "450ms"), [
        "A< ping", "A> pong", "A< ping", "A> pong", "A< ping", "A< timeout", "A< <EOF>",
        "--- server stdout ---",
        "conn 1: open", "conn 1: pong", "conn 1: pong", "conn 1: read deadline exceeded, closing", "conn 1: closed",
    ])


def test_shutdown(servers, go_bin):
    codes = {}

    def script(server: Server, connect) -> None:
        a = connect("A")
        a.say("a1")
        b = connect("B")
        b.say("b1")
        b.send("slow")
        server.out.wait_for("conn 2: working")
        server.proc.send_signal(signal.SIGTERM)
        b.read(), b.read(), b.read()  # the slow answer, then bye, then EOF
        a.read(), a.read()
        codes[server] = server.wait()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=STEP_TIMEOUT).close()

    results = {}
    for lang in LANGS:
        transcript, server = serve_and_drive(servers, argv_for(lang, "shutdown", go_bin, "-addr", "127.0.0.1:0"),
                                             script)
        results[lang] = transcript + [f"exit {codes[server]}"] + server.transcript()
    assert_transcripts(results, [
        "A> a1", "A< a1", "B> b1", "B< b1", "B> slow",
        "B< slow done", "B< bye", "B< <EOF>", "A< bye", "A< <EOF>",
        "exit 0",
        "conn 2: working", "shutdown: stopped accepting", "shutdown: every handler done",
    ])


def test_syncpool(servers, go_bin):
    def script(server: Server, connect) -> None:
        a = connect("A")
        b = connect("B")
        a.say("hello")
        b.say("gochat rocks")
        a.send_raw(b"x\n\ny\n")
        a.read(), a.read(), a.read()
        b.say("z" * 100_000)  # grows its buffer past the pooled size
        a.say("small again")

    assert_transcripts(run_both(servers, go_bin, "syncpool", script), [
        "A> hello", "A< 5 HELLO",
        "B> gochat rocks", "B< 12 GOCHAT ROCKS",
        "A> 'x\\n\\ny\\n'", "A< 1 X", "A< 0 ", "A< 1 Y",
        "B> " + "z" * 100_000, "B< <100007 bytes: 100000 ZZZZZZZZZZZZZ...>",
        "A> small again", "A< 11 SMALL AGAIN",
        "--- server stdout ---",
    ])


def test_recover(servers, go_bin):
    def script(server: Server, connect) -> None:
        a = connect("A")
        a.say("get 1")
        b = connect("B")
        b.say("get 7")  # the bug: out of range
        b.read()
        server.out.wait_for("conn 2: recovered")
        a.say("get 0")
        a.say("get x")
        a.say("dance")
        c = connect("C")
        c.say("get 2")
        a.close()
        server.out.wait_for("conn 1: closed")
        c.close()
        server.out.wait_for("conn 3: closed")
        server.err.wait_for("conn 2: panic")

    assert_transcripts(run_both(servers, go_bin, "recover", script), [
        "A> get 1", "A< banana",
        "B> get 7", "B< internal error", "B< <EOF>",
        "A> get 0", "A< apple", "A> get x", "A< not a number", "A> dance", "A< unknown command",
        "C> get 2", "C< cherry",
        "--- server stdout ---",
        "conn 1: open", "conn 2: open", "conn 2: recovered, closing", "conn 3: open", "conn 1: closed",
        "conn 3: closed",
    ])


def test_cpu_bound_work_stalls_the_loop_unless_in_the_threadpool():
    """examples/cpu_bound.py (no Go twin): inline work stalls every greenlet; the thread pool does not."""
    run = subprocess.run([sys.executable, str(EXAMPLES / "cpu_bound.py")], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    found = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in
             re.finditer(r"^(\S+): work (\d+) ms, heartbeat late by up to (\d+) ms$", run.stdout, re.M)}
    assert set(found) == {"inline", "threadpool", "threadpool-py"}, run.stdout
    (work, inline_late), (_, pooled_late) = found["inline"], found["threadpool"]
    assert inline_late >= work / 2, run.stdout  # the heartbeat waited for the whole computation
    assert pooled_late < inline_late, run.stdout
