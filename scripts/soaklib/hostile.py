"""The hostile clients of issue 11 for scripts/soak.py: each stays within its rate limit and
still costs the server dearly, unless the caps of PROTOCOL.md section 6 hold.

- room_flood: 100 connections hold 99 rooms each and create new rooms back to back
  (join, msg, leave), far past max_rooms;
- history_hammer: a room filled with 1000 messages of 4096 three-byte characters, asked for
  whole by readers at 10/s each and by clients that ask once and never read;
- dm_flood: 5 connections send 12 KB DMs at 20/s each to one victim that reads 256 KB/s;
- silent_tls: 500 TCP sockets from one address that never send a byte to the TLS server,
  while a TLS probe connects, says hello and pings every 0.5 s.

Each attack tallies what it did (connections, errors by code), notes every check it saw
fail, and reports figures for the soak's table (``Tally.figures``); the server-side checks
(ack latency of the steady load, /health, /stats rooms, RSS) are made by scripts/soak.py.

Runs in a worker process that gevent has monkey-patched (scripts/soak.py --worker NAME).
"""
from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Any, Callable

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.pool import Pool

from gochat.client import Client
from gochat.protocol import encode_json

from soaklib import SETTINGS, TLS_MAX_CONNECTIONS
from soaklib.attacks import Ctx, Tally, guarded, tr

# What one client may do on a server at PROTOCOL.md's default limits: every attack here paces
# its requests by this token bucket, a fifth of the soak server's own rate (which its steady
# load and older attacks need), so that what hurts the server is the cost of each request,
# not their number.
DEFAULT_RATE = 20.0
DEFAULT_BURST = 40
assert DEFAULT_RATE <= SETTINGS["rate"] and DEFAULT_BURST <= SETTINGS["burst"]
HANDSHAKE_TIMEOUT = SETTINGS["handshake_timeout"]
MAX_OUTBOUND = SETTINGS["max_outbound_bytes"]
MAX_HISTORY_BYTES = SETTINGS["max_history_bytes"]
REPLY_TIMEOUT = 30.0  # a reply this late is a failed check, not a hang of the attack
# The longest text the soak's server takes: max_text_chars (4096) characters of three UTF-8
# bytes, 12,288 bytes, fits max_frame_bytes (16,384) with the JSON around it; four-byte
# characters (16,384 bytes) would not.
BIG_TEXT = "€" * 4096


def _send(p: tr.Peer, message: dict) -> None:
    """UTF-8 on the wire, as a real client sends it (Peer's json.dumps would escape each € to six bytes)."""
    p.send_raw(encode_json(message))


def _replies(p: tr.Peer, ids: set, timeout: float = REPLY_TIMEOUT) -> dict[Any, dict]:
    """Read until every id in ``ids`` has its reply (or error); answer pings; skip room traffic."""
    got: dict[Any, dict] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(ids):
        m = p.read(max(0.01, deadline - time.monotonic()))
        kind = m.get("type")
        if kind == "ping":
            p.send({"type": "pong", "ts": m.get("ts")})
        elif kind not in ("msg", "presence", "dm") and m.get("id") in ids:
            got[m["id"]] = m
    return got


def _paced(started: float, requests: int, rate: float) -> None:
    """Sleep what is left of the time ``requests`` may take at ``rate`` per second."""
    gevent.sleep(max(0.0, requests / rate - (time.monotonic() - started)))


class Bucket:
    """The server's token bucket, kept on the client side: ``take`` waits until the requests fit."""

    def __init__(self, rate: float = DEFAULT_RATE, burst: int = DEFAULT_BURST) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self, n: int = 1) -> None:
        assert n <= self.burst
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n:
                self.tokens -= n
                return
            gevent.sleep((n - self.tokens) / self.rate)


# ---------------------------------------------------------------- room flood

ROOM_FLOOD_CONNECTIONS = 50  # per process: scripts/soak.py runs two, an address each
HELD_ROOMS = SETTINGS["max_rooms_per_session"] - 1  # each flooder stays in these; the last slot churns
# The held rooms are joined at the rate, a few at a time, not in each connection's burst: 100
# bursts of 40 at once would measure the server's throughput (the same with or without the
# caps), not what a room costs.
HELD_BATCH = 5


def room_flood(ctx: Ctx, t: Tally) -> None:
    """100 connections (50 per process) each join 99 rooms and stay (9,900 rooms with
    members, most of max_rooms), then create new rooms back to back within the default rate
    limit: join, one msg, leave, the next (about 670 new rooms a second in all). A new room
    past max_rooms must forget the least recently used empty room in O(1) (the held rooms sit
    at the front of the old broker's scan), or be refused (too_many_rooms) when every room has
    members, and must never forget itself: every ``joined`` must list its joiner. A quiet
    room of a witness must keep its seq, or restart under a new epoch."""
    source = f"127.0.9.{ctx.part + 1}"
    prefix = f"rf{ctx.seed % 1000}-{ctx.part}-"
    created = [0]
    waits: list[float] = []

    def flooder(c: int) -> None:
        p = tr.Peer(ctx.port, source=source, timeout=10)
        t.connections += 1
        try:
            nick = f"{prefix}{c}"
            bucket = Bucket()
            gevent.sleep(c / ROOM_FLOOD_CONNECTIONS)  # started over a second, not all at once
            bucket.take()
            p.hello(nick)
            for first in range(0, HELD_ROOMS, HELD_BATCH):
                ids = [f"h{k}" for k in range(first, min(HELD_ROOMS, first + HELD_BATCH))]
                gevent.sleep(len(ids) / DEFAULT_RATE)  # the server's bucket stays full for the churn
                p.send_raw(b"".join(encode_json({"type": "join", "room": f"{prefix}{c}-{rid}", "id": rid})
                                    for rid in ids))
                for reply in _replies(p, set(ids)).values():
                    _check_joined(t, reply, nick)
            n = 0
            while ctx.left() > 1:
                started = time.monotonic()
                bucket.take(3)
                room = f"{prefix}{c}-{n}"
                p.send_raw(encode_json({"type": "join", "room": room, "id": f"j{n}"})
                           + encode_json({"type": "msg", "room": room, "text": "x", "id": f"m{n}"})
                           + encode_json({"type": "leave", "room": room, "id": f"l{n}"}))
                got = _replies(p, {f"j{n}", f"m{n}", f"l{n}"})
                waits.append(time.monotonic() - started)
                _check_joined(t, got[f"j{n}"], nick)
                for reply in (got[f"m{n}"], got[f"l{n}"]):
                    if reply["type"] == "error":
                        t.errors[reply["code"]] += 1
                created[0] += 1
                n += 1
        finally:
            p.close()

    witness = _QuietRoom(ctx, f"{prefix}quiet", f"127.0.9.{ctx.part + 101}") if ctx.part == 0 else None
    if witness is not None:
        guarded(t, witness.post_first)
    pool = Pool(ctx.n(ROOM_FLOOD_CONNECTIONS))
    jobs = [pool.spawn(guarded, t, flooder, c) for c in range(ctx.n(ROOM_FLOOD_CONNECTIONS))]
    if len(gevent.joinall(jobs, timeout=ctx.left() + REPLY_TIMEOUT + 10)) < len(jobs):
        t.note("room flooders still running after their deadline")
        pool.kill(timeout=5)
    if witness is not None:
        guarded(t, witness.post_again)
    t.waves += 1
    t.figures["rooms created"] = created[0]
    t.figures["max seconds per join+msg+leave"] = round(max(waits, default=0.0), 3)


def _check_joined(t: Tally, reply: dict, nick: str) -> None:
    if reply["type"] == "error":
        t.errors[reply["code"]] += 1
    elif nick not in reply.get("members", []):
        t.note(f"a joined reply does not list its joiner (members {reply.get('members', [])[:3]}): "
               "the room forgot itself")


class _QuietRoom:
    """A room posted to once before the flood and once after: its seq must go on (or restart
    under a new epoch, when the broker forgot it: PROTOCOL.md section 3)."""

    def __init__(self, ctx: Ctx, room: str, source: str) -> None:
        self.ctx, self.room, self.source = ctx, room, source
        self.epoch = ""
        self.seq = 0

    def _post(self) -> tuple[dict, dict]:
        client = Client("127.0.0.1", self.ctx.port, source=self.source)
        try:
            client.hello(nick=tr.unique_nick("rfq"))
            joined = client.join(self.room)
            ack = client.send(self.room, "quiet")
            client.leave(self.room)
            return joined, ack
        finally:
            client.close()

    def post_first(self) -> None:
        joined, ack = self._post()
        self.epoch, self.seq = joined["epoch"], ack["seq"]

    def post_again(self) -> None:
        joined, ack = self._post()
        if joined["epoch"] == self.epoch and ack["seq"] != self.seq + 1:
            raise AssertionError(f"a quiet room's next msg got seq {ack['seq']} (after {self.seq}) "
                                 f"in the same epoch {self.epoch!r}")


# ---------------------------------------------------------------- history hammer

HAMMER_MESSAGES = SETTINGS["history_size"]  # the room retains every one: the biggest history there is
FILL_PER_CONNECTION = DEFAULT_BURST - 2  # the fill: a hello and a join take a token each
HAMMER_READERS = 4  # ask for the whole history 10 times a second, and read the replies
HAMMER_SILENT = 8  # ask once, never read, and stay alive with pongs (no token, no reply)
HAMMER_PACE = 10.0  # history requests per second per reader
SILENT_PONG_INTERVAL = 0.5
# RSS the server may add during the hammer: the room's messages (held as a dict, its text and
# its encoding: 3x the text), and per hammering connection what it may be owed (replies count
# toward max_outbound_bytes) plus one reply being written (max_history_bytes), plus slack for
# the allocator and the steady load.
HAMMER_RSS_SLACK = 32 * 2**20


def history_hammer(ctx: Ctx, t: Tally) -> None:
    """Fill one room with 1000 messages of 4096 three-byte characters (12 MB, each poster
    within its burst), then have 4 readers ask for all of it (limit 1000) 10 times a
    second and 8 clients ask once and never read. Each reader reply must come (a history of
    at least one message), and the server's RSS must stay within the bound reported in
    ``figures`` (checked by scripts/soak.py)."""
    room = f"hh{ctx.seed % 1000}-{ctx.part}"
    t.figures["fill seconds"] = round(_fill(ctx, t, room, ctx.n(HAMMER_MESSAGES)), 1)
    # A member stays in the room: a room without members may be forgotten when another attack
    # churns max_rooms (PROTOCOL.md section 6), and its history with it.
    keeper = Client("127.0.0.1", ctx.port, source="127.0.12.1")
    t.connections += 1
    try:
        keeper.hello(nick=f"hh{ctx.seed % 1000}-{ctx.part}-keeper")
        keeper.join(room)
        _hammer(ctx, t, room)
    finally:
        keeper.close()


def _hammer(ctx: Ctx, t: Tally, room: str) -> None:
    """The readers and the non-readers of history_hammer, until the deadline."""
    text_bytes = ctx.n(HAMMER_MESSAGES) * len(BIG_TEXT.encode())
    readers, silent = ctx.n(HAMMER_READERS), ctx.n(HAMMER_SILENT)
    t.figures["rss growth allowed MiB"] = round(
        (3 * text_bytes + (readers + silent) * (MAX_OUTBOUND + MAX_HISTORY_BYTES) + HAMMER_RSS_SLACK) / 2**20, 1)
    replies: list[tuple[float, int]] = []  # (seconds, bytes)
    dropped = [0]

    def reader(k: int) -> None:
        p = tr.Peer(ctx.port, source="127.0.12.2", timeout=10)
        t.connections += 1
        try:
            p.hello(f"hh{ctx.seed % 1000}-{ctx.part}-r{k}")
            n = 0
            while ctx.left() > 1:
                started = time.monotonic()
                _send(p, {"type": "history", "room": room, "since": 0, "limit": HAMMER_MESSAGES, "id": n})
                size = _history_reply(p, t, n)
                replies.append((time.monotonic() - started, size))
                n += 1
                _paced(started, 1, HAMMER_PACE)
        finally:
            p.close()

    def never_reads(k: int) -> None:
        for attempt in range(20):  # bounded: reconnects after the server dropped it
            if ctx.left() < 2:
                return
            p = tr.Peer(ctx.port, source="127.0.12.3", timeout=10, rcvbuf=4096)
            t.connections += 1
            try:
                p.hello(f"hh{ctx.seed % 1000}-{ctx.part}-s{k}-{attempt}")
                _send(p, {"type": "history", "room": room, "since": 0, "limit": HAMMER_MESSAGES, "id": 1})
                while ctx.left() > 1:
                    gevent.sleep(SILENT_PONG_INTERVAL)
                    p.send({"type": "pong", "ts": 1})
                return
            except OSError:
                dropped[0] += 1
            finally:
                p.close()

    jobs = [gevent.spawn(guarded, t, reader, k) for k in range(readers)]
    jobs += [gevent.spawn(guarded, t, never_reads, k) for k in range(silent)]
    if len(gevent.joinall(jobs, timeout=ctx.left() + REPLY_TIMEOUT + 10)) < len(jobs):
        t.note("history hammer clients still running after their deadline")
        gevent.killall(jobs, timeout=5)
    t.waves += 1
    t.figures["history replies read"] = len(replies)
    t.figures["max seconds per history reply"] = round(max((s for s, _ in replies), default=0.0), 3)
    t.figures["max bytes per history reply"] = max((size for _, size in replies), default=0)
    t.figures["non-readers dropped by the server"] = dropped[0]
    if not replies:
        t.note("no history reply came back at all")


def _history_reply(p: tr.Peer, t: Tally, rid: int) -> int:
    """Read lines until the reply to history request ``rid``; its size in bytes.

    A reply of the old server is one 12 MB line: it is found by its first and last bytes,
    not decoded (decoding it would cost this process more than the server spends on it).
    """
    deadline = time.monotonic() + REPLY_TIMEOUT
    while True:
        line = _raw_line(p, max(0.01, deadline - time.monotonic()))
        if len(line) > 2**20:
            if line.startswith(b'{"type":"history"') and f'"id":{rid}'.encode() in line[-200:]:
                return len(line)
            continue
        m = json.loads(line)
        if m.get("type") == "ping":
            p.send({"type": "pong", "ts": m.get("ts")})
        elif m.get("id") == rid and m.get("type") == "error":
            t.errors[m["code"]] += 1
            return len(line)
        elif m.get("id") == rid and m.get("type") == "history":
            if not m["messages"]:
                t.note("a history reply of the hammered room came back empty")
            return len(line)


def _raw_line(p: tr.Peer, timeout: float) -> bytes:
    """The next line from a Peer's socket (what Peer.read would decode), joined once, not per chunk."""
    p.sock.settimeout(timeout)
    chunks, pos = [p.buf], p.buf.find(b"\n")
    size = len(p.buf)
    while pos < 0:
        chunk = p.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed by server")
        found = chunk.find(b"\n")
        if found >= 0:
            pos = size + found
        chunks.append(chunk)
        size += len(chunk)
    data = b"".join(chunks)
    p.buf = data[pos + 1:]
    return data[:pos]


def _fill(ctx: Ctx, t: Tally, room: str, count: int) -> float:
    """Post ``count`` big messages to ``room``, every one acked: connections one after another,
    each within its burst (hello, join, FILL_PER_CONNECTION msgs, then bye, which takes no token),
    so that the room never has more than one member to deliver them to."""
    started = time.monotonic()
    acked = 0
    for k in range((count + FILL_PER_CONNECTION - 1) // FILL_PER_CONNECTION):
        share = min(FILL_PER_CONNECTION, count - k * FILL_PER_CONNECTION)
        p = tr.Peer(ctx.port, source="127.0.12.1", timeout=10)
        t.connections += 1
        try:
            p.hello(f"hh{ctx.seed % 1000}-{ctx.part}-p{k}")
            _send(p, {"type": "join", "room": room, "id": "j"})
            _replies(p, {"j"})
            ids = [f"m{i}" for i in range(share)]
            p.send_raw(b"".join(encode_json({"type": "msg", "room": room, "text": BIG_TEXT, "id": rid})
                                for rid in ids))
            for reply in _replies(p, set(ids)).values():
                if reply["type"] == "ack":
                    acked += 1
                else:
                    t.errors[reply["code"]] += 1
            p.send({"type": "bye"})
        except (Exception, gevent.Timeout) as exc:  # noqa: BLE001 - counted below, the fill goes on
            t.fail(exc)
        finally:
            p.close()
    if acked < count:
        t.note(f"the history room's fill: {acked} of {count} big messages acked")
    return time.monotonic() - started


# ---------------------------------------------------------------- DM flood

DM_SENDERS = 5
DM_PACE = DEFAULT_RATE  # DMs per second per sender
VICTIM_READ_BYTES = 16384
VICTIM_READ_INTERVAL = 1 / 16  # 256 KB/s: a modest reader, far slower than 5 x 20 x 12 KB/s
VICTIM_RCVBUF = 65536  # a remote client's window, not loopback's megabytes
VICTIM_PING_INTERVAL = 1.0  # liveness while its reads lag behind the server's pings


def dm_flood(ctx: Ctx, t: Tally) -> None:
    """5 connections send 12 KB DMs at 20/s each to one victim that reads 256 KB/s. The
    victim must never be closed (per-recipient dm_rate keeps what it is owed small) and must
    get DMs; the senders get rate_limited for the excess."""
    victim = _Victim(ctx, f"dv{ctx.seed % 1000}-{ctx.part}", "127.0.11.1")
    victim.connect()
    t.connections += 1
    watch = gevent.spawn(guarded, t, victim.run)
    sent, acked = [0], [0]

    def sender(k: int) -> None:
        for attempt in range(50):  # bounded: reconnects after the server closed it (max_strikes)
            if ctx.left() < 1:
                return
            p = tr.Peer(ctx.port, source="127.0.11.2", timeout=10)
            t.connections += 1
            reading = None
            try:
                p.hello(f"dv{ctx.seed % 1000}-{ctx.part}-s{k}-{attempt}")
                reading = gevent.spawn(_count_replies, p, t, acked)
                n = 0
                while ctx.left() > 1 and not reading.dead:
                    started = time.monotonic()
                    _send(p, {"type": "dm", "to": victim.nick, "text": BIG_TEXT, "id": n})
                    sent[0] += 1
                    n += 1
                    _paced(started, 1, DM_PACE)
                if ctx.left() > 1:
                    continue  # closed by the server: a new connection
                return
            except OSError:
                pass
            finally:
                if reading is not None:
                    reading.kill()
                p.close()

    gevent.joinall([gevent.spawn(guarded, t, sender, k) for k in range(ctx.n(DM_SENDERS))],
                   timeout=ctx.left() + 20)
    victim.stop()
    watch.join(timeout=5)
    t.waves += 1
    t.figures.update({"dms sent": sent[0], "dms acked": acked[0], "dms the victim read": victim.dms,
                      "victim closed by the server": victim.closes})
    if victim.closes:
        t.figures["victim first closed after s"] = victim.first_close
        t.note(f"the DM flood's victim was closed {victim.closes} times, the first after {victim.first_close} s")
    if not victim.dms:
        t.note("the DM flood's victim got no DM at all")


def _count_replies(p: tr.Peer, t: Tally, acked: list[int]) -> None:
    """A DM sender's reader: acks and errors (by code) until the server closes the connection."""
    try:
        while True:
            m = p.read(timeout=60)
            if m["type"] == "ack":
                acked[0] += 1
            elif m["type"] == "error":
                t.errors[m["code"]] += 1
            elif m["type"] == "ping":
                p.send({"type": "pong", "ts": m.get("ts")})
    except (OSError, ConnectionError):
        return


class _Victim:
    """A client that reads VICTIM_READ_BYTES every VICTIM_READ_INTERVAL and pings once a
    second; when the server closes it, it resumes its session (counted as a close)."""

    def __init__(self, ctx: Ctx, nick: str, source: str) -> None:
        self.ctx, self.nick, self.source = ctx, nick, source
        self.started = time.monotonic()
        self.session: str | None = None
        self.sock: gsocket.socket | None = None
        self.dms = 0
        self.closes = 0
        self.first_close = 0.0
        self.stopping = False
        self.buf = b""

    def connect(self) -> None:
        sock = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, VICTIM_RCVBUF)
        sock.bind((self.source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.ctx.port))
        hello = {"type": "hello", "resume": self.session} if self.session else {"type": "hello", "nick": self.nick}
        sock.sendall(encode_json(hello))
        self.sock, self.buf = sock, b""
        welcome = self._line()
        if welcome.get("type") != "welcome":  # the session expired meanwhile: start again
            self.session = None
            sock.sendall(encode_json({"type": "hello", "nick": self.nick}))
            welcome = self._line()
        self.session = welcome["session"]
        sock.settimeout(VICTIM_PING_INTERVAL)

    def _line(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(VICTIM_READ_BYTES)
            if not chunk:
                raise ConnectionError("closed by server")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def run(self) -> None:
        last_ping = 0.0
        for _ in range(200):  # bounded: reconnects
            try:
                while not self.stopping:
                    if time.monotonic() - last_ping > VICTIM_PING_INTERVAL:
                        self.sock.sendall(encode_json({"type": "ping"}))
                        last_ping = time.monotonic()
                    try:
                        chunk = self.sock.recv(VICTIM_READ_BYTES)
                    except socket.timeout:  # nothing owed: ping again
                        continue
                    if not chunk:
                        raise ConnectionError("closed by server")
                    self.buf += chunk
                    *lines, self.buf = self.buf.split(b"\n")
                    self.dms += sum(1 for line in lines if line.startswith(b'{"type":"dm"'))
                    gevent.sleep(VICTIM_READ_INTERVAL)
                return
            except OSError:
                if self.stopping:
                    return
                self.closes += 1
                if self.closes == 1:
                    self.first_close = round(time.monotonic() - self.started, 1)
                self.sock.close()
                gevent.sleep(0.2)
                self.connect()

    def stop(self) -> None:
        self.stopping = True
        if self.sock is not None:
            self.sock.close()


# ---------------------------------------------------------------- silent TLS sockets

SILENT_TLS_SOCKETS = 500  # from one address: more than the TLS server's handler pool (max_connections + 64)
TLS_PROBE_INTERVAL = 0.5
TLS_PROBE_LIMIT = 2.0  # connect + TLS handshake + hello + ping, seen by a process on a busy 2-CPU machine
TLS_PROBE_BASELINE = 4  # probes before the silent sockets open
RECLAIM_SLACK = 3.0  # the ticker, a lingering close, this process waiting for CPU


def silent_tls(ctx: Ctx, t: Tally) -> None:
    """Waves of 500 TCP sockets from one address to the TLS server that never send a byte,
    while a TLS probe from another address connects, says hello and pings every 0.5 s.
    Every silent socket must be closed by the server within handshake_timeout (or refused
    at once, over max_conns_per_ip); every probe must succeed within 2 s."""
    assert ctx.tls_port and ctx.tls_cert, "silent_tls needs the soak's TLS server"
    assert SILENT_TLS_SOCKETS > TLS_MAX_CONNECTIONS + 64, "the silent sockets must be able to fill the pool"
    context = ssl.create_default_context(cafile=ctx.tls_cert)
    probes: list[float] = []
    done = Event()

    def probe_once() -> float:
        started = time.monotonic()
        with gevent.Timeout(10):
            client = Client("127.0.0.1", ctx.tls_port, tls=context, source="127.0.10.2")
            try:
                client.hello(nick=tr.unique_nick("tp"))
                client.request({"type": "ping"})
            finally:
                client.close()
        return time.monotonic() - started

    def probing() -> None:
        while not done.is_set():
            started = time.monotonic()
            try:
                probes.append(probe_once())
            except (Exception, gevent.Timeout) as exc:  # noqa: BLE001 - a failed probe is the finding
                probes.append(float("inf"))
                t.note(f"a TLS probe failed beside silent sockets: {type(exc).__name__} {exc}")
            _paced(started, 1, 1 / TLS_PROBE_INTERVAL)

    for _ in range(TLS_PROBE_BASELINE):
        probes.append(guarded(t, probe_once) or float("inf"))
    baseline = max(probes, default=0.0)
    prober = gevent.spawn(probing)
    open_for: list[float] = []
    try:
        while ctx.left() > HANDSHAKE_TIMEOUT + RECLAIM_SLACK + 2:
            lifetimes = _silent_wave(ctx, t, SILENT_TLS_SOCKETS)  # not scaled: the pool must fill
            open_for += lifetimes
            late = [x for x in lifetimes if x > HANDSHAKE_TIMEOUT + RECLAIM_SLACK]
            if late:
                t.note(f"{len(late)} of {len(lifetimes)} silent TLS sockets were still open after "
                       f"{HANDSHAKE_TIMEOUT + RECLAIM_SLACK:.0f} s (handshake_timeout {HANDSHAKE_TIMEOUT} s)")
            t.waves += 1
    finally:
        done.set()
        prober.join(timeout=15)
    during = probes[TLS_PROBE_BASELINE:]
    slow = [x for x in during if x > TLS_PROBE_LIMIT]
    if slow:
        t.note(f"{len(slow)} of {len(during)} TLS probes took over {TLS_PROBE_LIMIT:.0f} s or failed")
    t.figures.update({
        "TLS probe max ms before": round(baseline * 1000, 1),
        "TLS probe max ms during": round(max(during, default=0.0) * 1000, 1) if all(
            x != float("inf") for x in during) else "failed",
        "TLS probes failed": sum(1 for x in during if x == float("inf")),
        "silent sockets reclaimed by the server": sum(1 for x in open_for if x <= HANDSHAKE_TIMEOUT + RECLAIM_SLACK),
        "silent sockets": len(open_for),
    })


def _silent_wave(ctx: Ctx, t: Tally, count: int) -> list[float]:
    """Open ``count`` silent sockets; the seconds until the server closed each (its deadline when it did not)."""
    deadline = HANDSHAKE_TIMEOUT + RECLAIM_SLACK + 1

    def silent(_: int) -> float:
        sock = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.10.1", 0))
            sock.settimeout(10)
            sock.connect(("127.0.0.1", ctx.tls_port))
            t.connections += 1
            started = time.monotonic()
            sock.settimeout(deadline)
            try:
                while sock.recv(4096):  # a server that refuses may send an alert first
                    pass
            except ConnectionResetError:
                pass
            except OSError:  # timed out: still open
                return deadline
            return time.monotonic() - started
        finally:
            sock.close()

    pool = Pool(count)
    jobs = [pool.spawn(guarded, t, silent, k) for k in range(count)]
    gevent.joinall(jobs, timeout=deadline + 15)
    pool.kill(timeout=5)
    return [job.value for job in jobs if isinstance(job.value, float)]


HOSTILE: dict[str, Callable[[Ctx, Tally], None]] = {
    "room_flood": room_flood,
    "history_hammer": history_hammer,
    "dm_flood": dm_flood,
    "silent_tls": silent_tls,
}
