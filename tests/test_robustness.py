"""Robustness: what hostile or broken clients and an unlucky operator can do, in volume.

Every test attacks a real ``gochat serve`` process over real sockets on 127.0.0.1 (other
source addresses 127.0.0.2.. stand for other machines). The conformance suite touches each
error once; these tests are about volume, timing and combinations: hundreds of concurrent
connections opened with gevent sockets in greenlets of this (unpatched) test process.

Rules the tests keep:

- Synchronisation is by events: a reply, a close, a presence message, a log line. Where the
  server exposes no event (its resource counters settling after the last socket closed), a
  bounded poll of /stats with a deadline is used (``settle``), and each use says why.
- Every loop is bounded in count and time; randomness is seeded.
- "Leaves nothing behind" compares /stats after an attack with /stats before it, exactly:
  connections, sessions, greenlets and open files must come back to their old values (no
  tolerance: every resource a connection holds is released when it ends, and the counters
  are read when the server is quiet). RSS is the exception (see ``RSS_REGROWTH``).
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re
import resource
import signal
import socket
import struct
import sys
import time
import zlib
from collections import Counter
from typing import Any, Callable, Iterable

import gevent
import pytest
from gevent import socket as gsocket
from gevent import subprocess as gsubprocess
from gevent.event import Event
from gevent.pool import Pool

from conftest import START_TIMEOUT, ServerProcess
from gochat.client import Client

# Every error code of PROTOCOL.md section 6, and those that close the connection.
ERROR_CODES = frozenset({
    "bad_json", "bad_request", "unknown_type", "bad_checksum", "hello_required", "bad_nick", "nick_taken",
    "bad_session", "unsupported_version", "auth_failed", "not_in_room", "no_such_user", "bad_room",
    "too_many_rooms", "rate_limited", "too_large", "too_many_connections", "slow_consumer", "idle_timeout",
    "handshake_timeout", "unavailable", "shutting_down"})
CLOSING_CODES = frozenset({"auth_failed", "too_large", "too_many_connections", "slow_consumer", "idle_timeout",
                           "handshake_timeout"})
SERVER_TYPES = frozenset({"welcome", "joined", "left", "ack", "msg", "dm", "presence", "who", "rooms", "history",
                          "ping", "pong", "error", "shutdown"})
FAST = 50_000  # rate and burst high enough that the token bucket never interferes
SETTLE_TIMEOUT = 10.0
# After a warm-up round, a second identical round of garbage (about 400 connections) may grow
# the server's RSS by at most this much. The first round grows pymalloc arenas and malloc's
# free lists (RSS never shrinks back) and the second still settles in by ~0.5 MiB on this
# machine; a connection's state left behind (its buffers, its greenlet: 8 KiB or more each)
# would add over 3 MiB per round.
RSS_REGROWTH = 3 * 2**20


# ---------------------------------------------------------------- helpers


def admin_get(server: ServerProcess, path: str, host: str | None = "127.0.0.1", source: str | None = None,
              timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, raw body) of one GET on the admin port, with a gevent socket: greenlets keep
    running while it waits (conftest's ``admin`` uses urllib, which would block this whole test
    process). ``host`` None sends no Host line; ``source`` picks the client address."""
    with gevent.Timeout(timeout):
        sock = gsocket.create_connection(("127.0.0.1", server.admin_port),
                                         source_address=(source, 0) if source else None)
        try:
            sock.sendall(f"GET {path} HTTP/1.0\r\n".encode() + (f"Host: {host}\r\n".encode() if host else b"")
                         + b"\r\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        finally:
            sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def gget(server: ServerProcess, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET on the admin port: (status, the JSON body parsed, or the text)."""
    status, body = admin_get(server, path, timeout=timeout)
    return status, json.loads(body) if body[:1] == b"{" else body.decode()


def stats(server: ServerProcess) -> dict:
    """/stats?walk=1: greenlets counted by a GC walk and descriptors by listing them, so that
    "leaves nothing behind" also catches what the server's own bookkeeping would not see."""
    return gget(server, "/stats?walk=1")[1]


def metrics(server: ServerProcess) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    values = {}
    for line in gget(server, "/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


RESOURCES = ("connections", "sessions", "greenlets", "open_files")


def settle(server: ServerProcess, want: dict, keys: Iterable[str] = RESOURCES,
           timeout: float = SETTLE_TIMEOUT) -> dict:
    """Poll /stats until ``keys`` equal ``want``'s values; the last /stats, or an AssertionError.

    Why a poll: the server frees a connection's greenlet and descriptor some milliseconds
    after the client saw the close (the handler finishes, lingers up to 1 s after an error
    close, then returns to the pool), and no event tells a client when that is done. The
    poll is bounded by ``timeout`` and each round is one /stats request.
    """
    keys = tuple(keys)
    deadline = time.monotonic() + timeout
    while True:
        now = stats(server)
        if all(now[k] == want[k] for k in keys):
            return now
        if time.monotonic() > deadline:
            diff = {k: (want[k], now[k]) for k in keys if now[k] != want[k]}
            raise AssertionError(f"server did not return to its earlier state (want, got): {diff}")
        gevent.sleep(0.05)


def quiet_stats(server: ServerProcess) -> dict:
    """/stats once the server is idle; two equal readings in a row make the baseline."""
    last = stats(server)
    for _ in range(40):  # bounded: 40 rounds of 50 ms
        gevent.sleep(0.05)
        now = stats(server)
        if all(now[k] == last[k] for k in RESOURCES):
            return now
        last = now
    raise AssertionError(f"server never became quiet: {last}")


def count_log(server: ServerProcess, pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(1 for line in list(server.lines) if regex.search(line))


def wait_for_log_count(server: ServerProcess, pattern: str, count: int, timeout: float = 10.0) -> int:
    """Wait until ``count`` log lines match ``pattern`` (log lines are the event).

    The log is collected by a thread of conftest; this waits on it in short slices so the
    greenlets of this process keep running meanwhile. Bounded by ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while (seen := count_log(server, pattern)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{seen} log lines match {pattern!r}, want {count}")
        gevent.sleep(0.02)
    return seen


def no_tracebacks(server: ServerProcess) -> None:
    bad = [line for line in server.lines if "Traceback" in line or "Too many open files" in line]
    assert not bad, "server printed tracebacks:\n" + "".join(server.lines[-40:])


_nicks = itertools.count(1)


def unique_nick(prefix: str) -> str:
    """A nick no other connection of this process uses (the pid keeps the soak's processes apart)."""
    return f"{prefix}{os.getpid() % 100000}-{next(_nicks)}"


def frame(payload: bytes, crc: int | None = None) -> bytes:
    return struct.pack(">II", len(payload), zlib.crc32(payload) if crc is None else crc) + payload


class Peer:
    """One raw connection from a greenlet: any bytes, any source address, any way to close.

    ``read`` decodes what the server sends in the connection's codec and checks that it
    is well formed (a server message never breaks the codec, whatever the client sent).
    """

    def __init__(self, port: int, codec: str = "json", source: str | None = None, timeout: float = 5.0,
                 rcvbuf: int | None = None) -> None:
        self.sock = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.codec = codec
        self.buf = b""
        self.eof = False
        if codec == "frames":
            self.sock.sendall(b"GCF1")

    def encode(self, obj: dict) -> bytes:
        data = json.dumps(obj).encode()
        return frame(data) if self.codec == "frames" else data + b"\n"

    def send(self, obj: dict) -> None:
        self.sock.sendall(self.encode(obj))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _next(self) -> dict | str | None:
        if self.codec == "frames":
            if len(self.buf) < 8:
                return None
            n, crc = struct.unpack(">II", self.buf[:8])
            if len(self.buf) < 8 + n:
                return None
            payload, self.buf = self.buf[8:8 + n], self.buf[8 + n:]
            assert zlib.crc32(payload) == crc, "server frame with a bad CRC"
            message = json.loads(payload)
        else:
            if b"\n" not in self.buf:
                return None
            line, self.buf = self.buf.split(b"\n", 1)
            if self.codec == "text":
                return line.decode()
            message = json.loads(line)
        assert isinstance(message, dict) and message.get("type") in SERVER_TYPES, message
        if message["type"] == "error":
            assert message["code"] in ERROR_CODES, message
        return message

    def read(self, timeout: float = 5.0) -> dict | str:
        """The next message; ConnectionError once the server has closed."""
        self.sock.settimeout(timeout)
        while (message := self._next()) is None:
            if self.eof:
                raise ConnectionError("closed by server")
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                if self.buf:
                    raise AssertionError(f"server closed mid-message: {self.buf[:100]!r}")
                raise ConnectionError("closed by server")
            self.buf += chunk
        return message

    def reply(self, timeout: float = 5.0) -> dict | str:
        """The next reply: what the server pushes meanwhile (pings, room traffic, presence) is skipped.
        In text mode, the next line starting with "! " (an error)."""
        while True:
            message = self.read(timeout)
            if self.codec == "text":
                if message.startswith("! "):
                    return message
            elif message["type"] not in ("ping", "msg", "presence", "dm"):
                return message

    def expect(self, type_: str, timeout: float = 5.0, **fields: Any) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            message = self.read(max(0.01, deadline - time.monotonic()))
            if message.get("type") == type_ and all(message.get(k) == v for k, v in fields.items()):
                return message

    def drain(self, timeout: float = 5.0) -> list:
        """Everything until the server closes (which must happen within ``timeout``)."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                out.append(self.read(max(0.01, deadline - time.monotonic())))
            except ConnectionError:
                return out

    def hello(self, nick: str, **extra: Any) -> dict:
        self.send({"type": "hello", "nick": nick, **extra})
        return self.expect("welcome")

    def reset(self) -> None:
        """Abortive close: SO_LINGER 0 makes the kernel send RST instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peers() -> Iterable[Callable[..., Peer]]:
    """Peer factory; every peer still open is closed after the test."""
    opened: list[Peer] = []

    def connect(*args: Any, **kwargs: Any) -> Peer:
        peer = Peer(*args, **kwargs)
        opened.append(peer)
        return peer

    yield connect
    for peer in opened:
        peer.close()


def run_all(func: Callable, items: Iterable, concurrency: int = 200, timeout: float = 30.0) -> list:
    """``func(item)`` for every item in greenlets, at most ``concurrency`` at a time; results in order.
    An exception in any of them fails the test (re-raised here)."""
    pool = Pool(concurrency)
    jobs = [pool.spawn(func, item) for item in items]
    done = gevent.joinall(jobs, timeout=timeout)
    if len(done) < len(jobs):
        pool.kill()
        raise AssertionError(f"{len(jobs) - len(done)} of {len(jobs)} jobs still running after {timeout} s")
    for job in jobs:
        if job.exception is not None:
            raise job.exception
    return [job.value for job in jobs]


PAIR_PROGRAM = r"""
from gevent import monkey; monkey.patch_all()
import json, sys, time
import gevent, gevent.socket
from gochat.client import Client
port, room = int(sys.argv[1]), sys.argv[2]
alice, bob = Client("127.0.0.1", port), Client("127.0.0.1", port)
alice.hello(nick="alice"); alice.join(room)
bob.hello(nick="bob"); bob.join(room)
print("ready", flush=True)
while True:  # "COUNT PAUSE": that many messages, each acked and received before the next
    gevent.socket.wait_read(sys.stdin.fileno())  # waiting, the clients still answer pings
    line = sys.stdin.readline()
    if not line:
        break
    count, pause = line.split()
    seqs, latencies = [], []
    for k in range(int(count)):
        started = time.monotonic()
        seq = alice.send(room, f"healthy {k}")["seq"]
        got = bob.expect("msg", room=room)
        latencies.append(time.monotonic() - started)
        seqs.append(seq if (got["seq"], got["text"]) == (seq, f"healthy {k}") else -1)
        gevent.sleep(float(pause))
    print(json.dumps({"seqs": seqs, "latencies": latencies}), flush=True)
"""


class Pair:
    """A healthy pair chatting through an attack, in a process of its own: ``alice`` posts,
    ``bob`` receives, each message acked and received before the next; the round trips are
    the server's responsiveness, not this test process's (busy running the attack)."""

    def __init__(self, port: int, room: str = "pair") -> None:
        self.proc = gsubprocess.Popen([sys.executable, "-c", PAIR_PROGRAM, str(port), room],
                                      stdin=gsubprocess.PIPE, stdout=gsubprocess.PIPE, text=True, bufsize=1)
        with gevent.Timeout(START_TIMEOUT):
            assert self.proc.stdout.readline() == "ready\n", "healthy pair did not start"
        self.seqs: list[int] = []
        self.latencies: list[float] = []

    def start(self, count: int, pause: float = 0.01) -> None:
        """Begin ``count`` exchanges, ``pause`` seconds apart (pacing them over the attack)."""
        self.proc.stdin.write(f"{count} {pause}\n")
        self.proc.stdin.flush()

    def check(self, limit: float, timeout: float = 30) -> None:
        """Wait for the exchanges (cooperatively): all in order, none slower than ``limit`` s."""
        with gevent.Timeout(timeout):
            result = json.loads(self.proc.stdout.readline())
        self.seqs, self.latencies = result["seqs"], result["latencies"]
        assert self.seqs == list(range(self.seqs[0], self.seqs[0] + len(self.seqs))), "healthy pair lost messages"
        worst = max(self.latencies)
        assert worst < limit, f"healthy pair slowed down: worst round trip {worst * 1000:.0f} ms"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except gsubprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def pair() -> Iterable[Callable[..., Pair]]:
    started: list[Pair] = []

    def start(port: int, room: str = "pair") -> Pair:
        started.append(Pair(port, room))
        return started[-1]

    yield start
    for p in started:
        p.close()


# ---------------------------------------------------------------- slowloris


def slowloris(port: int, kind: str, stop: Event, source: str | None = None) -> tuple[str, bytes, float]:
    """One attacker: (kind, every byte the server sent, seconds until the server closed, its address).

    The dribbling kinds send one byte every 0.1 s until the server closes the connection;
    the others send their bytes at once. The "mute" kinds say hello and then nothing, not
    even pong.
    """
    opened = time.monotonic()
    sock = gsocket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0) if source else None)
    nick = unique_nick("mute")
    hello = json.dumps({"type": "hello", "nick": nick}).encode()
    at_once, dribble = {
        "silent": (b"", b""),
        "blanks": (b"", b" " * 1000),  # only blanks: the codec stays unknown
        "magic_prefix": (b"", b"GC"),  # a strict prefix of GCF1: the codec stays unknown
        "half_hello": (b"", b'{"type":"hello","nick":"half","pad":"' + b"x" * 1000),  # json, no newline ever
        "half_nick": (b"", b"mallory" * 100),  # text, no newline ever
        "mute_json": (hello + b"\n", b""),
        "mute_frames": (b"GCF1" + frame(hello), b""),
    }[kind]
    chunks: list[bytes] = []

    def read_until_closed() -> None:
        while chunk := sock.recv(65536):
            chunks.append(chunk)

    local = "%s:%d" % sock.getsockname()[:2]  # the server logs its close under this address
    reader = gevent.spawn(read_until_closed)  # reads while the dribble goes on, like a real client
    try:
        sock.sendall(at_once)
        for byte in dribble:
            if reader.ready() or stop.is_set():
                break
            sock.sendall(bytes([byte]))
            reader.join(0.1)
        reader.get(timeout=10)
    except (ConnectionResetError, BrokenPipeError):
        pass  # the server closed while a dribbled byte was on its way
    except (gevent.Timeout, TimeoutError):
        raise AssertionError(f"{kind} from {local}: not closed within 10 s; got {b''.join(chunks)[:80]!r}") from None
    finally:
        reader.kill()
        sock.close()
    return kind, b"".join(chunks), time.monotonic() - opened, local


def test_slowloris_does_not_slow_a_healthy_pair_and_every_attacker_is_reclaimed(start_server, pair):
    s = start_server(handshake_timeout=1.0, heartbeat=0.3, idle_timeout=1.0, resume_window=0, rate=FAST, burst=FAST)
    healthy = pair(s.port)
    before = quiet_stats(s)
    kinds = ["silent", "blanks", "magic_prefix", "half_hello", "half_nick", "mute_json", "mute_frames"]
    per_kind = 50
    stop = Event()
    attack = gevent.spawn(run_all, lambda k: slowloris(s.port, k, stop), kinds * per_kind, 400, 20)
    healthy.start(80, pause=0.02)  # about 2 s of chat, across both timeouts
    results = attack.get(timeout=20)
    stop.set()
    healthy.check(limit=0.25)

    by_kind: dict[str, list[tuple[bytes, float]]] = {}
    for kind, received, lifetime, _ in results:
        by_kind.setdefault(kind, []).append((received, lifetime))
    for kind in ("silent", "blanks", "magic_prefix"):  # no codec yet: closed without a word
        assert all(r == b"" for r, _ in by_kind[kind]), kind
    for received, _ in by_kind["half_hello"]:
        assert [json.loads(line)["code"] for line in received.splitlines()] == ["handshake_timeout"]
    for received, _ in by_kind["half_nick"]:
        assert received.decode().startswith("! handshake_timeout:"), received
    for received, _ in by_kind["mute_json"]:
        messages = [json.loads(line) for line in received.splitlines()]
        types = [m["type"] for m in messages]
        assert types[0] == "welcome" and "ping" in types and messages[-1].get("code") == "idle_timeout", types
    for received, _ in by_kind["mute_frames"]:
        assert b'"idle_timeout"' in received and b'"ping"' in received
    for kind, lifetimes in by_kind.items():
        timeout = 1.0
        worst = max(t for _, t in lifetimes)
        # reclaimed on time: the timeout, plus the ticker (0.03 s), plus 1 s of lingering
        # close after an error (conn.LINGER_TIMEOUT) that ends at once when the peer reads
        assert timeout * 0.9 < min(t for _, t in lifetimes) and worst < timeout + 1.5, (kind, worst)

    m = metrics(s)
    assert m['gochat_connections_closed_total{reason="handshake_timeout"}'] == 5 * per_kind
    assert m['gochat_connections_closed_total{reason="idle_timeout"}'] == 2 * per_kind
    settle(s, before)  # no event says the server has freed everything: see settle()
    no_tracebacks(s)


# ---------------------------------------------------------------- garbage

# The wrong-type table: for each request, its fields and values of a wrong type for each.
# Every one must get bad_request (or bad_room, for a string that is not a room name), and
# the error message names the field.
WRONG = [True, 1, 1.5, "x" * 65, [], {}, [1, [2]], {"a": None}]
REQUEST_FIELDS: dict[str, dict[str, Any]] = {
    # type: {field: a valid value}
    "join": {"room": "r", "since": 0},
    "leave": {"room": "r"},
    "msg": {"room": "r", "text": "t"},
    "dm": {"to": "g0", "text": "t"},
    "who": {"room": "r"},
    "history": {"room": "r", "since": 0, "limit": 5},
    "ping": {"ts": 1},
}
ACCEPTS: dict[str, Callable[[Any], bool]] = {  # which values each field takes (PROTOCOL.md section 3)
    "room": lambda v: isinstance(v, str),
    "text": lambda v: isinstance(v, str),
    "to": lambda v: isinstance(v, str),
    "since": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "limit": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "ts": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)) or (isinstance(v, str) and len(v) <= 64),
}


def wrong_type_cases() -> list[tuple[bytes, str, str]]:
    """(line, expected code, word the message must contain) for every field of every request."""
    cases = []
    for type_, fields in REQUEST_FIELDS.items():
        for field in fields:
            for value in WRONG:
                if ACCEPTS[field](value):
                    continue
                request = {"type": type_, **fields, field: value, "id": "w"}
                code = "bad_room" if field == "room" and isinstance(value, str) else "bad_request"
                cases.append((json.dumps(request).encode() + b"\n", code, field))
    for value in WRONG + [None]:  # the type field itself, and the id
        if not isinstance(value, str) or value == "x" * 65:
            cases.append((json.dumps({"type": value}).encode() + b"\n", "unknown_type" if isinstance(value, str)
                          else "bad_request", "type"))
        if not isinstance(value, int) and value is not None:
            cases.append((json.dumps({"type": "ping", "id": value}).encode() + b"\n", "bad_request", "id"))
    for field, value in (("v", "1"), ("v", 1.5), ("v", 2), ("nick", 5), ("nick", ["a"]), ("token", {}), ("resume", 1)):
        code = "unsupported_version" if value == 2 else "bad_request"
        cases.append((json.dumps({"type": "hello", "nick": "n", field: value}).encode() + b"\n", code, ""))
    return cases


MAX_FRAME = 16384  # max_frame_bytes of the garbage server


def deep(depth: int) -> bytes:
    return b'{"type":"ping","id":"deep","x":' + b"[" * depth + b"]" * depth + b"}\n"


# (name, bytes, the reply: an error code, or a reply type) on a json connection after hello.
JSON_GARBAGE: list[tuple[str, bytes, str]] = [
    ("invalid utf-8", b'{"type":"ping","ts":"\xff\xfe"}\n', "bad_json"),
    ("surrogate bytes", b'{"type":"ping","ts":"\xed\xa0\x80"}\n', "bad_json"),
    ("overlong utf-8", b'{"type":"ping","ts":"\xc0\xaf"}\n', "bad_json"),
    ("lone surrogate escape in text", b'{"type":"msg","room":"r","text":"\\ud800"}\n', "bad_request"),
    ("nul bytes", b"\x00\x00\x00\n", "bad_json"),
    ("not an object", b"[1,2]\n", "bad_json"),
    ("a string", b'"hello"\n', "bad_json"),
    ("null", b"null\n", "bad_json"),
    ("empty object", b"{}\n", "bad_request"),
    ("trailing data", b'{"type":"ping"} {"type":"ping"}\n', "bad_json"),
    ("trailing comma", b'{"type":"ping",}\n', "bad_json"),
    ("truncated object", b'{"type":"ping","ts":\n', "bad_json"),
    ("nested 500 deep (ignored field)", deep(500), "pong"),
    ("nested 3000 deep", deep(3000), "bad_json"),
    ("nested objects 2000 deep", b'{"type":"ping","x":' + b'{"a":' * 2000 + b"1" + b"}" * 2001 + b"\n", "bad_json"),
    ("infinite float", b'{"type":"ping","ts":1e400}\n', "bad_request"),
    ("NaN", b'{"type":"ping","ts":NaN}\n', "bad_request"),
    ("huge id", b'{"type":"ping","id":18446744073709551616}\n', "bad_request"),
    ("huge since", b'{"type":"join","room":"r","since":123456789012345678901234567890}\n', "joined"),
    ("huge limit", b'{"type":"history","room":"r","limit":9223372036854775807}\n', "history"),
    ("huge ts echoed", b'{"type":"ping","ts":123456789012345678901234567890}\n', "pong"),
    ("4000-digit ts", b'{"type":"ping","ts":' + b"9" * 4000 + b"}\n", "pong"),
    ("negative since", b'{"type":"history","room":"r","since":-1}\n', "bad_request"),
    ("unknown type", b'{"type":"teleport"}\n', "unknown_type"),
    ("text too long", json.dumps({"type": "msg", "room": "r", "text": "é" * 4097}, ensure_ascii=False).encode() + b"\n", "bad_request"),
    ("bad room name", b'{"type":"join","room":"no spaces"}\n', "bad_room"),
    ("room name too long", json.dumps({"type": "who", "room": "r" * 65}).encode() + b"\n", "bad_room"),
    ("msg to a room not joined", b'{"type":"msg","room":"elsewhere","text":"x"}\n', "not_in_room"),
    ("dm to nobody", b'{"type":"dm","to":"nobody-here","text":"x"}\n', "no_such_user"),
    ("second hello", b'{"type":"hello","nick":"again"}\n', "bad_request"),
]
# (name, bytes after the GCF1 magic, the reply) on a frames connection after hello.
FRAME_GARBAGE: list[tuple[str, bytes, str]] = [
    ("bad crc", frame(b'{"type":"ping"}', crc=12345), "bad_checksum"),
    ("bad crc on garbage", frame(b"\xff" * 100, crc=0), "bad_checksum"),
    ("empty payload", frame(b""), "bad_json"),
    ("invalid utf-8 payload", frame(b'{"type":"\xff"}'), "bad_json"),
    ("array payload", frame(b"[]"), "bad_json"),
    ("a json line inside a frame", frame(b'{"type":"ping"}\n{"type":"ping"}'), "bad_json"),
    ("deep payload", frame(deep(3000)[:-1]), "bad_json"),
    ("wrong type field", frame(b'{"type":["ping"]}'), "bad_request"),
]


def garbage_connection(port: int, case: tuple, source: str | None = None) -> Counter:
    """One connection, one piece of garbage, the exact reply, and proof that it still serves."""
    codec, name, data, want = case
    peer = Peer(port, codec, source)
    answered = Counter([want] if want in ERROR_CODES else [])
    try:
        if codec == "text":
            peer.send_raw(unique_nick("t").encode() + b"\n")
            first = peer.read()
            assert first.startswith("* welcome"), (name, first)
            peer.send_raw(data)
            reply = peer.reply()  # skips joined lobby, and others talking there
            assert reply.startswith(f"! {want}"), (name, reply)
            if want == "too_large":
                assert peer.drain() == [] and peer.eof
                return answered
            peer.send_raw(b"/rooms\n")
            while not (reply := peer.read()).startswith("* rooms:"):
                assert not reply.startswith("! "), (name, reply)
            return answered
        peer.send({"type": "hello", "nick": unique_nick("g")})
        peer.expect("welcome")
        peer.send({"type": "join", "room": "r"})
        peer.expect("joined")
        peer.send({"type": "msg", "room": "r", "text": "so that r has history", "id": "before"})
        peer.expect("ack", id="before")
        peer.send_raw(data)
        reply = peer.reply()  # others come, go and talk in room r meanwhile
        if want in ERROR_CODES:
            assert reply["type"] == "error" and reply["code"] == want, (name, reply)
        else:
            assert reply["type"] == want, (name, reply)
        if want in CLOSING_CODES:
            assert peer.drain() == [] and peer.eof, name
            return answered
        peer.send({"type": "ping", "id": "after"})
        assert peer.expect("pong")["id"] == "after", name  # the connection still serves
        return answered
    except ConnectionError:
        raise AssertionError(f"{codec} {name}: the server closed the connection") from None
    finally:
        peer.close()


def wrong_type_connection(port: int, cases: list[tuple[bytes, str, str]], source: str | None = None) -> Counter:
    """Many wrong-typed requests on one connection, each with its exact error."""
    peer = Peer(port, source=source)
    try:
        peer.hello(unique_nick("wt"))
        for line, code, field in cases:
            peer.send_raw(line)
            reply = peer.reply()
            assert reply["type"] == "error" and reply["code"] == code and field in reply["message"], (line, reply)
        peer.send({"type": "ping", "id": "after"})
        assert peer.expect("pong")["id"] == "after"
        return Counter(code for _, code, _ in cases)
    finally:
        peer.close()


def closing_garbage(port: int, case: tuple, source: str | None = None) -> Counter:
    """Garbage that ends the connection: too large, or truncated by the client's own close."""
    codec, kind = case
    peer = Peer(port, codec, source)
    try:
        if kind == "oversized":
            try:
                if codec == "frames":
                    peer.send_raw(struct.pack(">II", MAX_FRAME + 1, 0))  # the header alone is enough to refuse
                elif codec == "json":
                    peer.send_raw(b'{"type":"ping","pad":"' + b"x" * MAX_FRAME)  # no newline: refused all the same
                else:
                    peer.send_raw(b"x" * (MAX_FRAME + 1))
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before all of it was sent: the answer is already waiting
            reply = peer.reply()
            assert (reply.startswith("! too_large") if codec == "text" else reply["code"] == "too_large"), reply
            assert peer.drain() == [] and peer.eof
            return Counter(["too_large"])
        # truncated: half a frame or half a line, then the client's FIN
        peer.send_raw(frame(b'{"type":"hello","nick":"cut"}')[:20] if codec == "frames" else b'{"type":"hel')
        peer.sock.shutdown(socket.SHUT_WR)
        rest = peer.drain()
        assert rest == [] and peer.eof, rest  # nothing owed, closed quietly
        return Counter()
    finally:
        peer.close()


def random_bytes_connection(port: int, seed: int, source: str | None = None) -> Counter:
    """Seeded random bytes, then the client's FIN; everything the server answers must be well formed
    in the codec the first bytes chose, with PROTOCOL.md codes, and it must close after our FIN."""
    rng = random.Random(seed)
    start = rng.choice([b"", b"GCF1", b"{", b" \r\n{", b"\x00", b"GCF1" + struct.pack(">I", rng.randrange(3000))])
    data = start + rng.randbytes(rng.randrange(1, 3000))
    if rng.random() < 0.5:  # sprinkle line ends so json/text lines complete
        data = b"\n".join(data[i:i + 40] for i in range(0, len(data), 40)) + b"\n"
    head = data.lstrip(b" \t\r\n")
    codec = "frames" if data.startswith(b"GCF1") else "json" if head[:1] == b"{" else "text"
    peer = Peer(port, "json", source)
    peer.codec = codec  # the server answers in the codec the bytes chose
    codes: Counter = Counter()
    try:
        peer.sock.sendall(data)
        peer.sock.shutdown(socket.SHUT_WR)
        for message in peer.drain(timeout=5):  # read() checks every message is well formed
            if codec == "text":
                if message.startswith("! "):
                    codes[message[2:].split(":")[0]] += 1
            elif message["type"] == "error":
                codes[message["code"]] += 1
        assert peer.eof
        assert set(codes) <= ERROR_CODES
    except (ConnectionResetError, BrokenPipeError):
        pass  # a too_large close can race our own sendall: the server stopped reading
    finally:
        peer.close()
    return codes


FUZZ_VALUES: dict[str, list[Any]] = {  # good and nasty values for each field the fuzz client fills
    "room": ["fuzz", "a:b.c-d_e", "", "x" * 65, "bad room", "é", 5, None, [], {"r": 1}],
    "text": ["hi", "", "é" * 50, "x" * 4097, "\ud800", "\x00", 1, None, ["t"]],
    "to": ["fz0", "fz1", "nobody", "", "x" * 200, 7, None],
    "since": [0, 1, 3, -1, 10**30, 1.5, "1", None, True],
    "limit": [1, 5, 1000, 0, -5, 10**19, 2.5, "9", None],
    "ts": [0, -1, 1.5, 10**25, 1e300, "abc", "x" * 65, None, [], {}, False],
    "nick": ["fz", "bad nick", "", 1, None],
}
FUZZ_REQUESTS = {  # type: (fields it may carry, the reply type when it is valid)
    "join": (("room", "since"), "joined"), "leave": (("room",), "left"), "msg": (("room", "text"), "ack"),
    "dm": (("to", "text"), "ack"), "who": (("room",), "who"), "rooms": ((), "rooms"),
    "history": (("room", "since", "limit"), "history"), "ping": (("ts",), "pong"), "pong": (("ts",), None),
    "hello": (("nick",), "welcome"), "teleport": (("room",), None),
}


def fuzz_client(port: int, seed: int, source: str | None = None) -> Counter:
    """A seeded random client: valid and invalid requests with nasty field values, some with
    their bytes corrupted, all pipelined. Every uncorrupted request with an id gets exactly
    one reply echoing it (its reply type, or a non-closing error); then a final ping works.
    Returns the errors the server answered, by code."""
    rng = random.Random(seed)
    codec = rng.choice(["json", "frames"])
    peer = Peer(port, codec, source)
    errors: Counter = Counter()
    try:
        peer.hello(f"fz{seed}")
        expected: dict[int, str | None] = {}
        for k in range(60):
            type_ = rng.choice(list(FUZZ_REQUESTS))
            fields, reply = FUZZ_REQUESTS[type_]
            request: dict[str, Any] = {"type": type_, "id": k}
            for field in fields:
                if rng.random() < 0.85:
                    request[field] = rng.choice(FUZZ_VALUES[field])
            if rng.random() < 0.1:
                request[rng.choice(["x", "type", "id"])] = rng.choice([[], {}, 1e10, None, "?"])
            corrupt = rng.random() < 0.1
            if corrupt and request.get("id") == k:
                request["id"] = f"c{k}"  # a corrupted id may not become another request's
            data = peer.encode(request)
            if corrupt:  # corrupt a byte: its reply cannot be predicted, only checked
                # not the frame header (a corrupt length is too_large), not the json newline
                i = rng.randrange(8, len(data)) if codec == "frames" else rng.randrange(len(data) - 1)
                data = data[:i] + bytes([rng.choice(b'\xff{}"[]\n 0')]) + data[i + 1:]
            elif request.get("id") == k:
                expected[k] = reply
            peer.send_raw(data)
        peer.send({"type": "ping", "id": "final"})
        replies: dict[Any, list[dict]] = {}
        while True:
            message = peer.read()
            if message["type"] == "error":
                errors[message["code"]] += 1
                assert message["code"] not in CLOSING_CODES, message
            if message["type"] in ("msg", "dm", "presence"):
                continue  # deliveries, not replies (a msg carries its sender's id)
            if message.get("id") == "final" and message["type"] == "pong":
                break
            replies.setdefault(message.get("id"), []).append(message)
        for k, reply_type in expected.items():
            got = replies.get(k, [])
            if reply_type is None:  # pong, or an unknown type: nothing, or an error
                assert all(m["type"] == "error" for m in got) and len(got) <= 1, (seed, k, got)
            else:
                assert len(got) == 1 and got[0]["type"] in (reply_type, "error"), (seed, k, got)
    except ConnectionError:
        raise AssertionError(f"fuzz client {seed}: the server closed the connection") from None
    finally:
        peer.close()
    return errors


def garbage_jobs(seed: int) -> list[tuple[Callable[..., Counter], Any]]:
    """About 400 connections' worth of garbage: (function, its argument) pairs; each function
    takes (port, argument, source) and returns the errors the server answered, by code."""
    cases = ([("json", *c) for c in JSON_GARBAGE] + [("frames", *c) for c in FRAME_GARBAGE]
             + [("text", "invalid utf-8 line", b"\xff\xfe\n", "bad_request"),
                ("text", "unknown command", b"/teleport now\n", "bad_request"),
                ("text", "overlong line", b"x" * (MAX_FRAME + 1), "too_large")])
    wrong = wrong_type_cases()
    chunks = [wrong[i::10] for i in range(10)]
    jobs: list[tuple[Callable[..., Counter], Any]] = [(garbage_connection, c) for c in cases * 4]
    jobs += [(wrong_type_connection, c) for c in chunks * 2]
    jobs += [(closing_garbage, (codec, kind)) for codec in ("json", "frames", "text")
             for kind in ("oversized", "truncated")] * 10
    jobs += [(random_bytes_connection, seed * 1000 + k) for k in range(150)]
    jobs += [(fuzz_client, seed * 1000 + k) for k in range(60)]
    return jobs


def garbage_round(port: int, seed: int, source: str | None = None, concurrency: int = 200) -> Counter:
    """Every job of ``garbage_jobs``, at most ``concurrency`` at a time; the errors answered, by code."""
    total: Counter = Counter()
    for codes in run_all(lambda job: job[0](port, job[1], source), garbage_jobs(seed), concurrency=concurrency):
        total.update(codes)
    return total


def test_huge_since_and_limit_on_a_room_with_history(start_server, peers):
    """Integers beyond 64 bits are valid JSON and valid values of since/limit (>= 0, >= 1):
    they mean "nothing newer" and "no limit", never a crash (the room must have history)."""
    s = start_server()
    c = peers(s.port)
    c.hello("big")
    c.send({"type": "join", "room": "r"})
    c.expect("joined")
    c.send({"type": "msg", "room": "r", "text": "one", "id": 1})
    c.expect("ack", id=1)
    for since in (2**63 - 1, 2**63, 10**30):
        c.send({"type": "history", "room": "r", "since": since, "id": "h"})
        assert c.expect("history", id="h")["messages"] == []
        c.send({"type": "join", "room": "r", "since": since, "id": "j"})
        assert c.expect("joined", id="j")["seq"] == 1
    c.send({"type": "history", "room": "r", "limit": 10**19, "id": "l"})
    assert [m["seq"] for m in c.expect("history", id="l")["messages"]] == [1]
    assert metrics(s).get("gochat_handler_exceptions_total", 0) == 0


def test_garbage_on_hundreds_of_connections_gets_protocol_errors_and_leaks_nothing(start_server, pair):
    # history_size 10: the rooms' retained history is full after the first round (it is not a leak)
    s = start_server(max_frame_bytes=MAX_FRAME, rate=FAST, burst=FAST, resume_window=0, history_size=10)
    healthy = pair(s.port)
    before = quiet_stats(s)
    healthy.start(100)  # a healthy pair chats through the first round
    codes = garbage_round(s.port, seed=1)
    healthy.check(limit=0.25)
    assert codes["too_large"] and codes["bad_json"], codes  # the random bytes did reach the parsers
    settle(s, before)  # see settle(): no event tells when the last handler has returned
    warm = stats(s)
    garbage_round(s.port, seed=1)  # the same round again: a leak grows again, a warm allocator does not
    after = settle(s, before)
    grown = after["rss_bytes"] - warm["rss_bytes"]
    assert grown < RSS_REGROWTH, f"RSS grew {grown / 2**20:.1f} MiB in a second identical round"
    m = metrics(s)
    assert m.get("gochat_handler_exceptions_total", 0) == 0
    no_tracebacks(s)


# ---------------------------------------------------------------- slow consumers


class Reader:
    """A member reading everything in a greenlet, checking that a room's seqs arrive in order."""

    def __init__(self, client: Client, room: str) -> None:
        self.client, self.room = client, room
        self.seqs: list[int] = []
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        for message in self.client:
            if message.get("type") == "msg" and message.get("room") == self.room:
                self.seqs.append(message["seq"])

    def wait_for(self, seq: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while (not self.seqs or self.seqs[-1] < seq) and time.monotonic() < deadline and not self.greenlet.dead:
            gevent.sleep(0.01)  # the reader greenlet appends; this only looks
        assert self.seqs == list(range(1, seq + 1)), f"{self.client.nick}: got {len(self.seqs)} of {seq} in order"


def flood(sender: Client, room: str, count: int, size: int = 4000) -> int:
    """``count`` messages of ``size`` bytes in windows of 40 (the last of each acked, so the
    readers of this process keep up); returns the last seq."""
    text = "f" * size
    last = 0
    for _ in range(count // 40):
        for _ in range(39):
            sender.send_nowait({"type": "msg", "room": room, "text": text})
        last = sender.send(room, text)["seq"]  # acks come in order: the whole window is in
    return last


def test_slow_consumers_are_dropped_and_memory_stays_bounded(start_server, chat, peers):
    cap, size, history = 128 * 1024, 4000, 50
    s = start_server(max_outbound_bytes=cap, rate=FAST, burst=FAST, history_size=history)
    room, stuck_count = "flood", 12
    stuck = []
    for k in range(stuck_count):  # members that never read, with a small receive buffer
        p = peers(s.port, rcvbuf=4096)
        p.hello(f"stuck{k}")
        p.send({"type": "join", "room": room, "id": "j"})
        stuck.append(p)
    readers = [Reader(chat(s.port, f"reader{k}", room=room), room) for k in range(2)]
    sender = chat(s.port, "sender", room=room)
    for p in stuck:
        p.expect("joined", id="j")  # joined before the flood (the socket is read this once)
    before = stats(s)
    peak = {"rss_bytes": before["rss_bytes"]}
    sampling = True

    def sample() -> None:  # the server's RSS while the flood runs: /stats every 50 ms
        while sampling:
            peak["rss_bytes"] = max(peak["rss_bytes"], stats(s)["rss_bytes"])
            gevent.sleep(0.05)

    sampler = gevent.spawn(sample)
    # Each stuck member first fills the kernel's socket buffers (about 3 MB here), only then
    # the server's own buffer: 8 MB drop them all, within a bound of 16 MB.
    sent = flood(sender, room, 2000, size)
    wait_for_log_count(s, r"nick=stuck\d+ reason=slow_consumer", stuck_count, timeout=5)
    when_dropped = stats(s)["rss_bytes"]
    sent = flood(sender, room, 2000, size)  # 8 MB more: a server that kept them would grow again
    sampling = False
    sampler.join()
    for r in readers:
        r.wait_for(sent)  # every message, in order, nothing lost
    after = stats(s)
    assert metrics(s)['gochat_errors_sent_total{code="slow_consumer"}'] == stuck_count
    # The bound of docs/robustness.md: connections x max_outbound_bytes for the buffers, plus
    # the retained history (a dict and two encodings per message), plus 8 MiB for the
    # interpreter's own churn (decoded requests, the feeds of a loop turn, allocator slack).
    bound = (stuck_count + 3) * cap + history * size * 3 + 8 * 2**20
    grown = max(peak["rss_bytes"], after["rss_bytes"]) - before["rss_bytes"]
    assert grown < bound, f"RSS grew {grown / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
    regrown = after["rss_bytes"] - when_dropped
    assert regrown < 2 * 2**20, f"RSS grew {regrown / 2**20:.1f} MiB after the drops, for 8 MB more flood"
    for p in stuck:
        p.close()
    settle(s, {"connections": 3}, keys=("connections",))  # readers and sender only


def test_a_reader_that_stalls_briefly_is_not_a_slow_consumer(start_server, peers, chat):
    """max_outbound_bytes limits the backlog, not the total a connection has ever received.

    The reader first takes 4.8 MB promptly (more than the cap of 4 MiB, in total), then
    stalls while 5.2 MB arrive: the kernel's buffers take about 3-4 MB of that, the
    server's backlog stays well under the cap, so the reader must not be dropped.
    """
    cap = 4 * 2**20
    s = start_server(max_outbound_bytes=cap, rate=FAST, burst=FAST)
    reader = peers(s.port, rcvbuf=65536)
    reader.hello("staller")
    reader.send({"type": "join", "room": "r", "id": "j"})
    reader.expect("joined", id="j")
    sender = chat(s.port, "sender", room="r")
    seqs: list[int] = []

    def read_until(seq: int) -> None:
        while not seqs or seqs[-1] < seq:
            message = reader.read(timeout=10)
            if message["type"] == "msg":
                seqs.append(message["seq"])

    phase1 = gevent.spawn(read_until, 1200)
    assert flood(sender, "r", 1200) == 1200
    phase1.get(timeout=20)
    last = flood(sender, "r", 1320)  # nobody reads meanwhile
    try:
        read_until(last)
    except (ConnectionError, AssertionError):  # closed, mid-message or not
        wait_for_log_count(s, r"nick=staller reason=", 1)
        dropped = [line for line in s.lines if "nick=staller reason=" in line]
        raise AssertionError(f"reader dropped after {len(seqs)} of {last} messages: {dropped}") from None
    assert seqs == list(range(1, last + 1))


# ---------------------------------------------------------------- churn


class Observer:
    """A member of every churned room, recording the presence it sees (the event that proves
    a churned session is gone: its offline presence, after resume_window)."""

    def __init__(self, client: Client, rooms: list[str]) -> None:
        self.client = client
        for room in rooms:
            client.join(room)
        self.joined: dict[str, str] = {}  # nick -> room
        self.offline: set[str] = set()
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        for message in self.client:
            if message.get("type") == "presence":
                if message["status"] == "join":
                    self.joined[message["nick"]] = message["room"]
                elif message["status"] == "offline":
                    self.offline.add(message["nick"])

    def wait_all_offline(self, nicks: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not nicks <= self.offline and time.monotonic() < deadline:
            gevent.sleep(0.02)  # the observer greenlet records presence; this only looks
        missing = nicks - self.offline
        assert not missing, f"{len(missing)} sessions never went offline, e.g. {sorted(missing)[:5]}"


def churn_cycle(port: int, job: tuple[int, str], source: str | None = None, prefix: str = "ch") -> str | None:
    """One connect/.../close cycle of the given kind; the nick that joined a room, if any."""
    i, kind = job
    nick, room = f"{prefix}{i}", f"c{i % 5}"
    if kind == "text":
        p = Peer(port, "text", source)
        p.send_raw(nick.encode() + b"\n")
        while not p.read().startswith("* joined lobby"):
            pass
        p.reset()
        return nick
    p = Peer(port, source=source)
    if kind == "no_hello_reset":
        p.reset()
        return None
    if kind == "half_hello_close":
        p.send_raw(b'{"type":"hel')
        p.close()
        return None
    welcome = p.hello(nick)
    p.send({"type": "join", "room": room, "id": "j"})
    p.expect("joined", id="j")
    if kind == "close":
        p.close()
    elif kind == "reset":
        p.reset()
    elif kind == "half_close":  # FIN, then read what is owed until the server closes too
        p.sock.shutdown(socket.SHUT_WR)
        p.drain()
        p.close()
    elif kind == "bye":
        p.send({"type": "bye"})
        p.drain()
        p.close()
    elif kind == "resume_reset":  # drop, come back (maybe before the server noticed), then RST
        p.close()
        again = Peer(port, source=source)
        again.send({"type": "hello", "resume": welcome["session"]})
        assert again.expect("welcome")["nick"] == nick
        again.reset()
    elif kind == "dead":  # a silent peer that keeps its socket: only idle_timeout finds it
        messages = p.drain(timeout=30)
        errors = [m["code"] for m in messages if m["type"] == "error"]
        # closed by idle_timeout; or, if it was so dead that it fell behind the room's presence
        # traffic by max_outbound_bytes (the soak's busy rooms), dropped as a slow consumer
        assert errors == ["idle_timeout"] or (not errors and p.eof), messages[-3:]
        p.close()
    return nick


def test_churn_leaves_no_ghosts_fds_or_greenlets(start_server, chat):
    s = start_server(resume_window=0.5, heartbeat=0.2, idle_timeout=0.6, rate=FAST, burst=FAST)
    rooms = ["lobby"] + [f"c{k}" for k in range(5)]
    observer = Observer(chat(s.port, "observer"), rooms)
    before = quiet_stats(s)
    rng = random.Random(7)
    kinds = ["close", "reset", "half_close", "bye", "resume_reset", "no_hello_reset", "half_hello_close", "text"]
    jobs = [(i, rng.choice(kinds)) for i in range(2000)] + [(2000 + i, "dead") for i in range(40)]
    started = time.monotonic()
    joined = {n for n in run_all(lambda job: churn_cycle(s.port, job), jobs, concurrency=60, timeout=40) if n}
    churn_seconds = time.monotonic() - started
    observer.wait_all_offline(joined, timeout=10)  # each after its resume_window
    assert set(observer.joined) == joined

    for room in rooms:
        assert observer.client.who(room) == ["observer"], room
    assert sorted((r["room"], r["members"]) for r in observer.client.rooms()) == sorted((r, 1) for r in rooms)
    after = settle(s, before)  # see settle(): handlers end a little after their clients saw the close
    assert after["sessions_awaiting_resume"] == 0
    m = metrics(s)
    assert m["gochat_connections"] == 1 and m["gochat_sessions"] == 1 and m["gochat_sessions_awaiting_resume"] == 0
    closed = sum(v for k, v in m.items() if k.startswith("gochat_connections_closed_total"))
    rejected = sum(v for k, v in m.items() if k.startswith("gochat_connections_rejected_total"))
    assert m["gochat_connections_accepted_total"] == closed + rejected + 1  # + the observer, still open
    assert m['gochat_connections_closed_total{reason="idle_timeout"}'] == 40
    assert m["gochat_connections_accepted_total"] >= len(jobs)
    assert churn_seconds < 30, churn_seconds
    no_tracebacks(s)


# ---------------------------------------------------------------- floods


def over_cap_attempt(port: int, source: str) -> tuple[str, float, Peer | None]:
    """Connect from ``source`` and say hello at once: ('welcome', t, peer kept open) or
    ('too_many_connections', t, None), t from the first byte sent to the answer."""
    p = Peer(port, source=source)
    started = time.monotonic()
    p.send({"type": "hello", "nick": unique_nick("x")})
    reply = p.read(timeout=10)
    elapsed = time.monotonic() - started
    if reply["type"] == "welcome":
        return "welcome", elapsed, p
    assert reply["code"] == "too_many_connections", reply
    assert p.drain() == [] and p.eof
    p.close()
    return reply["code"], elapsed, None


def test_connection_floods_are_refused_fast_without_hurting_connected_clients(start_server, pair):
    per_ip, cap = 10, 60
    s = start_server(max_conns_per_ip=per_ip, max_connections=cap, resume_window=0, rate=FAST, burst=FAST)
    healthy = pair(s.port)  # two connections from 127.0.0.1
    before = quiet_stats(s)
    healthy.start(150)
    # One address opens 300 connections at once: 10 are served, 290 refused.
    a = run_all(lambda _: over_cap_attempt(s.port, "127.0.0.2"), range(300))
    outcome = Counter(r[0] for r in a)
    assert outcome == {"welcome": per_ip, "too_many_connections": 300 - per_ip}, outcome
    # Eleven more addresses, ten connections each: the server fills up to max_connections.
    sources = [f"127.0.0.{k}" for k in range(3, 14)]
    b = run_all(lambda src: over_cap_attempt(s.port, src), [src for src in sources for _ in range(per_ip)])
    outcome_b = Counter(r[0] for r in b)
    room_left = cap - 2 - per_ip
    assert outcome_b == {"welcome": room_left, "too_many_connections": len(b) - room_left}, outcome_b
    assert gget(s, "/ready") == (503, {"ready": False, "reason": "full"})
    healthy.check(limit=0.25)
    slowest = max(t for code, t, _ in a + b if code == "too_many_connections")
    assert slowest < 1.0, f"a refusal took {slowest:.2f} s"
    m = metrics(s)
    # checked in this order: max_connections (only phase two reaches it), then the address's cap
    assert m['gochat_connections_rejected_total{reason="max_conns_per_ip"}'] == 300 - per_ip
    assert m['gochat_connections_rejected_total{reason="max_connections"}'] == len(b) - room_left
    for _, _, p in a + b:
        if p is not None:
            p.close()
    settle(s, before)  # see settle()
    assert gget(s, "/ready")[0] == 200


def test_silent_over_cap_flood_does_not_lock_out_other_addresses(start_server):
    """Connections over max_conns_per_ip that never send a byte must not keep clients of
    other addresses from connecting (nor hold the accept loop)."""
    s = start_server(max_conns_per_ip=5, max_connections=100)
    stop = Event()
    held: list[socket.socket] = []

    def silent_flood() -> None:  # one address, connections that never send: 1500 at most
        for k in range(1500):
            if stop.is_set():
                return
            sock = gsocket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", s.port))
            held.append(sock)
            if k % 50 == 49:
                gevent.sleep(0.05)  # about 1000 connections a second

    flood_greenlet = gevent.spawn(silent_flood)
    try:
        gevent.sleep(0.5)  # the flood is under way
        waits = []
        for k in range(4):
            started = time.monotonic()
            c = Client("127.0.0.1", s.port, source="127.0.0.3")
            c.hello(nick=f"legit{k}")
            waits.append(time.monotonic() - started)
            c.close()
            gevent.sleep(0.2)
    finally:
        stop.set()
        flood_greenlet.join()
        for sock in held:
            sock.close()
    assert max(waits) < 0.5, f"clients of another address waited {[round(w, 2) for w in waits]} s to connect"


def flooder(port: int, job: tuple[int, str], source: str | None = None, prefix: str = "flood"
            ) -> tuple[int, list[str], str]:
    """Sends 400 requests at once without waiting; (acks, rate_limited messages, how it ended)."""
    i, kind = job
    p = Peer(port, source=source)
    try:
        p.hello(f"{prefix}{i}")
        p.send({"type": "join", "room": "noisy", "id": "j"})
        p.expect("joined", id="j")
        if kind == "msg":
            data = b"".join(p.encode({"type": "msg", "room": "noisy", "text": "spam", "id": k}) for k in range(400))
        else:  # garbage costs a token too
            data = b"{not json\n" * 400
        try:
            p.send_raw(data)
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed after max_strikes while the rest was on its way
        acks, limited = 0, []
        for message in p.drain(timeout=5):
            if message["type"] == "ack":
                acks += 1
            elif message.get("code") == "rate_limited":
                limited.append(message["message"])
        return acks, limited, "closed" if p.eof else "open"
    finally:
        p.close()


def test_message_floods_are_rate_limited_then_disconnected(start_server, chat, pair):
    rate, burst, strikes = 50, 20, 30
    s = start_server(rate=rate, burst=burst, max_strikes=strikes, resume_window=0)
    healthy = pair(s.port, room="calm")
    watcher = Reader(chat(s.port, "watcher", room="noisy"), "noisy")
    before = quiet_stats(s)
    healthy.start(15, 0.05)  # within the pair's own rate limit
    started = time.monotonic()
    results = run_all(lambda job: flooder(s.port, job), [(i, "msg") for i in range(40)] +
                      [(40 + i, "garbage") for i in range(20)])
    elapsed = time.monotonic() - started
    healthy.check(limit=0.25)
    total_acks = 0
    for acks, limited, end in results:
        assert end == "closed"
        # hello and join took two tokens of the burst; refills add rate x elapsed at most
        assert acks <= burst - 2 + rate * elapsed + 1, acks
        assert len(limited) >= strikes and f"closed after {strikes} limited" in limited[-1], limited[-3:]
        total_acks += acks
    watcher.wait_for(total_acks)  # every accepted flood message reached the room, in order
    m = metrics(s)
    assert m['gochat_connections_closed_total{reason="rate_limited"}'] == len(results)
    settle(s, before)  # see settle()
    no_tracebacks(s)


# A client that sends as fast as it can, in a process of its own so that it can outpace
# the server: hello, then MB megabytes of one request over and over, then close.
# Arguments: port, MB, the request, the nick[, the source address].
PONG = '{"type":"pong","ts":1}'  # the cheapest request there is: no token, no reply
FLOOD_PROGRAM = r"""
import socket, sys
port, mb, line = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3].encode() + b"\n"
source = (sys.argv[5], 0) if len(sys.argv) > 5 else None
sock = socket.create_connection(("127.0.0.1", port), source_address=source)
sock.sendall(b'{"type":"hello","nick":"' + sys.argv[4].encode() + b'"}\n')
sock.recv(4096)
chunk, sent = line * (65536 // len(line)), 0
while sent < mb * 1e6:
    sock.sendall(chunk)
    sent += len(chunk)
sock.close()
"""


def test_a_client_faster_than_the_server_does_not_stall_the_others(start_server, pair):
    """Pongs take no token and ask for no reply, so a client can send them faster than they
    are served, for as long as it likes. The reader yields every FAIR_SHARE requests
    (conn.py); before that, one 60 MB pong flood held every other client for 10 s."""
    s = start_server()
    healthy = pair(s.port, room="calm")
    nicks = ["flood-a", "flood-b"]
    procs = [gsubprocess.Popen([sys.executable, "-c", FLOOD_PROGRAM, str(s.port), "8", PONG, nick])
             for nick in nicks]
    healthy.start(40, pause=0.05)
    healthy.check(limit=0.5)
    for proc, nick in zip(procs, nicks):
        assert proc.wait(timeout=60) == 0
        s.wait_for_log(f"nick={nick} reason=peer_closed", timeout=60)  # every byte served, then EOF


# ---------------------------------------------------------------- handler faults


def faulty(port: int, i: int, source: str | None = None, prefix: str = "faulty") -> None:
    """A connection whose handler raises (GOCHAT_TEST_FAULTS): after hello and a message, or first thing."""
    p = Peer(port, source=source)
    try:
        if i % 3:
            p.hello(f"{prefix}{i}")
            p.send({"type": "join", "room": "faulty", "id": "j"})
            p.expect("joined", id="j")
            p.send({"type": "msg", "room": "faulty", "text": f"last words {i}", "id": "m"})
            p.expect("ack", id="m")
        p.send({"type": "test_fault"})
        rest = p.drain(timeout=5)  # closed: nothing but room traffic comes before the end
        assert all(m["type"] in ("msg", "presence") for m in rest), rest
        assert p.eof
    finally:
        p.close()


def test_many_handler_faults_close_only_their_connections(start_server, chat, pair):
    s = start_server(test_faults=1, resume_window=0, rate=FAST, burst=FAST)
    healthy = pair(s.port)
    watcher = Observer(chat(s.port, "watcher"), ["faulty"])
    before = quiet_stats(s)
    faults = 300
    healthy.start(100)
    run_all(lambda i: faulty(s.port, i), range(faults), concurrency=100)
    healthy.check(limit=0.25)
    in_room = {f"faulty{i}" for i in range(faults) if i % 3}
    watcher.wait_all_offline(in_room, timeout=10)  # resume_window 0: offline at once, by the hub
    wait_for_log_count(s, r"RuntimeError: fault injected by test_fault", faults)
    assert count_log(s, r"ERROR gochat.conn: handler failed for") == faults
    assert count_log(s, r"^Traceback \(most recent call last\)") == faults
    m = metrics(s)
    assert m["gochat_handler_exceptions_total"] == faults
    assert m['gochat_connections_closed_total{reason="handler_exception"}'] == faults
    assert watcher.client.who("faulty") == ["watcher"]
    settle(s, before)  # see settle()


# ---------------------------------------------------------------- acked means delivered


class FlakyMember:
    """A member that drops its connection at random (FIN or RST) and resumes within
    resume_window, then joins with since = the last seq it saw. It checks, per connection,
    the order PROTOCOL.md section 5 gives: live messages newer than the resume come first,
    then ``joined`` and the replay of exactly what was missed, then live messages again."""

    def __init__(self, port: int, nick: str, room: str, rng: random.Random, source: str | None = None) -> None:
        self.port, self.nick, self.room, self.rng, self.source = port, nick, room, rng, source
        self.session: str | None = None
        self.last_seen = 0
        self.messages: dict[int, dict] = {}  # seq -> msg, each seq exactly once
        self.connections = 0
        self.replayed = 0  # messages that came by replay rather than live
        self.live_first = 0  # resumes where live messages came before the joined reply
        self.peer: Peer | None = None

    def connect(self) -> None:
        """Hello (or resume) and join; checks the order of everything up to the replay's end."""
        p = self.peer = Peer(self.port, source=self.source)
        self.connections += 1
        if self.session is None:
            p.send({"type": "hello", "nick": self.nick})
            self.session = p.expect("welcome")["session"]
            p.send({"type": "join", "room": self.room, "id": "j"})
            p.expect("joined", id="j")
            return
        p.send({"type": "hello", "resume": self.session})
        welcome = p.expect("welcome")
        assert (welcome["nick"], welcome["session"]) == (self.nick, self.session)  # the same session
        p.send({"type": "join", "room": self.room, "since": self.last_seen, "id": "j"})
        live_before = []
        while (m := p.read())["type"] != "joined":
            if m["type"] == "msg":
                live_before.append(m)
        assert m["first_seq"] <= self.last_seen + 1, "resumed in time but history was lost"
        if not live_before:
            return  # replay and live then form one run, checked by take()
        self.live_first += 1
        mark = live_before[0]["seq"] - 1  # the room's seq when the session was resumed
        assert [x["seq"] for x in live_before] == list(range(mark + 1, mark + 1 + len(live_before)))
        replay = [self._next_msg(p) for _ in range(mark - self.last_seen)]
        assert [x["seq"] for x in replay] == list(range(self.last_seen + 1, mark + 1)), "replay not exact"
        for x in replay + live_before:
            self.take(x)
        self.replayed += len(replay)

    def _next_msg(self, p: Peer, timeout: float = 5.0) -> dict:
        while (m := p.read(timeout))["type"] != "msg":
            pass
        return m

    def take(self, m: dict) -> None:
        assert m["seq"] == self.last_seen + 1, f"{self.nick}: seq {m['seq']} after {self.last_seen}"
        assert m["seq"] not in self.messages
        self.messages[m["seq"]] = m
        self.last_seen = m["seq"]

    def read_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.take(self._next_msg(self.peer, timeout=left))
            except socket.timeout:
                return

    def drop(self) -> None:
        if self.rng.random() < 0.5:
            self.peer.reset()
        else:
            self.peer.close()

    def run(self, stop: Event) -> None:
        self.connect()
        for _ in range(1000):  # bounded; ends when the flood does
            if stop.is_set():
                return
            self.read_for(self.rng.uniform(0.02, 0.15))
            self.drop()
            stop.wait(self.rng.uniform(0, 0.1))  # offline for a while (well inside resume_window)
            self.connect()

    def catch_up(self, last: int) -> None:
        """The final resume: everything up to ``last``."""
        self.drop()
        self.connect()
        while self.last_seen < last:
            self.take(self._next_msg(self.peer))
        self.peer.close()


def flaky_sender(port: int, count: int, rng: random.Random, acked: dict, source: str | None = None,
                 nick: str = "flaky-sender", room: str = "acked") -> int:
    """Sends ``count`` messages with ids; drops the connection at random before reading an ack,
    resumes, and sends the same id again: the ack (first or dup) is the same seq, and the
    message exists once. Returns how many resends there were."""
    p = Peer(port, source=source)
    p.send({"type": "hello", "nick": nick})
    session = p.expect("welcome")["session"]
    p.send({"type": "join", "room": room, "id": "j"})
    p.expect("joined", id="j")
    resends = 0
    for k in range(count):
        request = {"type": "msg", "room": room, "text": f"flaky {k}", "id": f"fs{k}"}
        p.send(request)
        while rng.random() < 0.15:  # gone before the ack arrived: resume and resend
            p.reset() if rng.random() < 0.5 else p.close()
            p = Peer(port, source=source)
            p.send({"type": "hello", "resume": session})
            p.expect("welcome")
            p.send(request)
            resends += 1
        ack = p.expect("ack", id=f"fs{k}")
        acked[ack["seq"]] = (nick, f"fs{k}")
    p.close()
    return resends


def test_acked_messages_reach_every_resuming_member_exactly_once_in_order(start_server, chat):
    s = start_server(resume_window=5, rate=FAST, burst=FAST, history_size=5000)
    rng = random.Random(42)
    members = [FlakyMember(s.port, f"member{k}", "acked", random.Random(rng.random())) for k in range(8)]
    for member in members:
        member.connect()
    senders = [chat(s.port, f"sender{k}", room="acked") for k in range(3)]
    acked: dict[int, tuple[str, str]] = {}

    def steady_sender(client: Client, count: int) -> None:
        for k in range(count):
            ack = client.send("acked", f"{client.nick} {k}", id=f"{client.nick}-{k}")
            acked[ack["seq"]] = (client.nick, f"{client.nick}-{k}")
            if k % 20 == 19:
                gevent.sleep(0.01)  # a flood, but one the members can take while connected

    stop = Event()
    flaky = [gevent.spawn(m.run, stop) for m in members]
    sending = [gevent.spawn(steady_sender, c, 300) for c in senders]
    resends = gevent.spawn(flaky_sender, s.port, 150, random.Random(9), acked)
    gevent.joinall(sending + [resends], timeout=40, raise_error=True)
    stop.set()
    gevent.joinall(flaky, timeout=10, raise_error=True)
    last = max(acked)
    assert sorted(acked) == list(range(1, last + 1))  # acks hold distinct seqs, no gaps
    assert resends.value > 0
    for member in members:
        member.catch_up(last)
        assert member.connections > 3, member.connections
        assert sorted(member.messages) == list(range(1, last + 1))  # every acked message, once
        for seq, (sender, rid) in acked.items():
            assert (member.messages[seq]["from"], member.messages[seq]["id"]) == (sender, rid)
    # both orders of section 5 happened: live messages before the replay, and replays
    assert sum(m.live_first for m in members) > 0 and sum(m.replayed for m in members) > 0
    for c in senders:
        c.close()


def test_after_resume_window_the_client_learns_what_it_lost(start_server, chat, peers):
    s = start_server(resume_window=0.3, history_size=20, rate=FAST, burst=FAST)
    watcher = Observer(chat(s.port, "watcher"), ["r"])
    sender = chat(s.port, "sender", room="r")
    member = peers(s.port)
    session = member.hello("late")["session"]
    member.send({"type": "join", "room": "r", "id": "j"})
    member.expect("joined", id="j")
    for k in range(5):
        sender.send("r", f"m{k}")
    last_seen = max(member.expect("msg")["seq"] for _ in range(5))
    member.reset()
    watcher.wait_all_offline({"late"}, timeout=5)  # the window has passed: the event is offline
    for k in range(50):
        sender.send("r", f"n{k}")
    again = peers(s.port)
    again.send({"type": "hello", "resume": session})
    assert again.expect("error")["code"] == "bad_session"
    again.hello("late")  # the nick is free again
    again.send({"type": "join", "room": "r", "since": last_seen, "id": "j"})
    joined = again.expect("joined", id="j")
    assert (joined["seq"], joined["first_seq"]) == (55, 36)
    lost = joined["first_seq"] - 1 - last_seen  # what the client can tell its user
    assert lost == 30
    assert [again.expect("msg")["seq"] for _ in range(20)] == list(range(36, 56))


# ---------------------------------------------------------------- resource limits


class LimitedServer(ServerProcess):
    """``gochat serve`` started with a lowered RLIMIT_NOFILE (set in the child before exec)."""

    def __init__(self, nofile: tuple[int, int], args: list[str] | None = None, **settings: Any) -> None:
        super().__init__(args, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile), **settings)


@pytest.fixture
def limited_server() -> Iterable[Callable[..., LimitedServer]]:
    started: list[LimitedServer] = []

    def start(nofile: tuple[int, int], args: list[str] | None = None, **settings: Any) -> LimitedServer:
        server = LimitedServer(nofile, args, **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def soft_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as fh:
        for line in fh:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


def test_the_soft_open_file_limit_is_raised_to_the_hard_limit_and_logged(limited_server):
    s = limited_server((256, 1024), max_connections=500)
    s.wait_for_log(r" INFO gochat\.server: open-file limit: soft 1024, hard 1024$")
    assert soft_nofile(s.proc.pid) == 1024
    assert stats(s)["open_files_limit"] == 1024
    assert not [line for line in s.lines if "does not fit" in line]  # 500 connections fit in 1024


def test_max_connections_that_cannot_fit_is_said_at_start_and_enforced(limited_server, peers):
    s = limited_server((300, 300), ["--max-connections", "5000"])
    warning = s.wait_for_log(r"does not fit")
    assert " WARNING " in warning and "5000" in warning
    s.wait_for_log(r"open-file limit: soft 300, hard 300")
    cap = stats(s)["max_connections"]
    assert 0 < cap < 300
    held = run_all(lambda k: (p := Peer(s.port), p.hello(f"fd{k}"))[0], range(cap), concurrency=100)
    extra = Peer(s.port)
    extra.send({"type": "hello", "nick": "one-too-many"})
    assert extra.read()["code"] == "too_many_connections"  # refused, not an accept() failure
    held[0].send({"type": "ping", "id": 1})
    assert held[0].expect("pong")["id"] == 1
    for p in held + [extra]:
        p.close()
    no_tracebacks(s)


def test_a_flood_at_the_open_file_limit_never_runs_out_of_descriptors(limited_server):
    """With max_connections fitted to the limit, descriptors for refusing the excess must fit
    too: accept() never fails with EMFILE (which gevent prints as tracebacks and answers by
    pausing the listener)."""
    s = limited_server((200, 200), max_connections=0)
    cap = stats(s)["max_connections"]
    held = run_all(lambda k: (p := Peer(s.port), p.hello(f"fd{k}"))[0], range(cap), concurrency=100)
    silent: list[socket.socket] = []

    def connect_silently(_: int) -> None:
        sock = gsocket.create_connection(("127.0.0.1", s.port), timeout=10)
        silent.append(sock)

    run_all(connect_silently, range(300))
    held[0].send({"type": "ping", "id": 1})
    assert held[0].expect("pong")["id"] == 1
    for sock in silent:
        sock.close()
    for p in held:
        p.close()
    settle(s, {"connections": 0}, keys=("connections",))
    emfile = [line for line in s.lines if "Too many open files" in line]
    assert not emfile, f"accept() ran out of descriptors {len(emfile)} times"


def test_a_connection_burst_while_the_server_stalls_waits_in_the_backlog(start_server):
    """600 clients connect while the server's process is frozen (SIGSTOP: a stand-in for a
    long GC pause, a CPU-starved host, a slow disk write of the log). The kernel keeps the
    completed handshakes in the listen backlog; once the server runs again it must serve
    them all at once (0.1 s here with a backlog of SOMAXCONN). With a backlog smaller than
    the burst (gevent's default is 128), the handshakes beyond it are dropped and those
    clients are served only after a TCP retransmission (0.8 s here, then 1 s, 3 s...)."""
    s = start_server(max_connections=2000, rate=FAST, burst=FAST)
    served: list[float] = []

    def client(k: int) -> None:
        p = Peer(s.port, timeout=15)
        p.hello(f"burst{k}")
        served.append(time.monotonic())
        p.close()

    s.signal(signal.SIGSTOP)
    try:
        jobs = [gevent.spawn(client, k) for k in range(600)]
        # The server is frozen: no event can come from it. 0.5 s lets every connect() reach
        # the kernel (it answers SYNs for a frozen process as long as its backlog has room).
        gevent.sleep(0.5)
    finally:
        s.signal(signal.SIGCONT)
    resumed = time.monotonic()
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert len(served) == 600
    worst = max(served) - resumed
    assert worst < 0.5, f"the last of 600 clients was served {worst:.1f} s after the server resumed"
