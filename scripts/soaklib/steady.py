"""The steady chat load of scripts/soak.py, and its readers' loss accounting.

Senders post with ids and record every ack and how long it took (the soak's latency
reference); readers record every seq they receive. Both
survive being disconnected (by the server's limits or its bugs): a sender resumes and
resends the same id (exactly-once makes that safe), a reader resumes and joins with
``since`` = the last seq it saw (PROTOCOL.md section 5). A message is lost when it was
acked and some reader of its room never got it; received twice counts as a duplicate.

Runs in a worker process that gevent has monkey-patched.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import gevent
import gevent.socket

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_robustness as tr  # noqa: E402

from gochat.client import ChatError, Client  # noqa: E402


class SteadyReader:
    """A resumable member of one room that reads everything, answers pings, and checks order.

    On each connection, msgs with seq <= the ``joined`` seq are the replay (they must run
    contiguously from ``since`` + 1), all others are live (they must run contiguously too).
    """

    def __init__(self, port: int, nick: str, room: str, source: str | None = None) -> None:
        self.port, self.nick, self.room, self.source = port, nick, room, source
        self.session: str | None = None
        self.seqs: set[int] = set()
        self.high = 0  # every seq up to here was received (or came before this member joined)
        self.base = 0  # the room's seq when this member first joined
        self.duplicates = 0
        self.order_errors = 0
        self.connections = 0
        self.drops = 0
        self.expired = 0  # resumes refused: the session was gone
        self.latencies: list[float] = []  # seconds from the server's ts to receipt, live msgs
        self.peer: tr.Peer | None = None
        self.greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self.greenlet = gevent.spawn(self._run)

    def _connect(self) -> int:
        """Hello or resume, then join; returns the joined seq."""
        p = self.peer = tr.Peer(self.port, source=self.source, timeout=10)
        self.connections += 1
        since = None
        if self.session is not None:
            p.send({"type": "hello", "resume": self.session})
            reply = p.read()
            if reply["type"] == "error":  # the window passed: what was missed is lost
                self.expired += 1
                self.session = None
        if self.session is None:
            p.send({"type": "hello", "nick": self.nick})
            self.session = p.expect("welcome")["session"]
        else:
            since = self.high
        request: dict[str, Any] = {"type": "join", "room": self.room, "id": "j"}
        if since is not None:
            request["since"] = since
        p.send(request)
        while True:
            m = p.read()
            if m["type"] == "joined" and m.get("id") == "j":
                return m["seq"]
            self._on(m, None)

    def _on(self, m: dict, joined_seq: int | None) -> None:
        kind = m.get("type")
        if kind == "ping":
            self.peer.send({"type": "pong", "ts": m.get("ts")})
            return
        if kind != "msg" or m.get("room") != self.room:
            return
        seq = m["seq"]
        if seq in self.seqs:
            self.duplicates += 1
            return
        self.seqs.add(seq)
        live = joined_seq is None or seq > joined_seq
        if live:
            self.latencies.append(max(0.0, time.time() - m["ts"] / 1000))
            if self._last_live is not None and seq != self._last_live + 1:
                self.order_errors += 1
            self._last_live = seq
        else:
            if seq != self._last_replay + 1:
                self.order_errors += 1
            self._last_replay = seq
        while self.high + 1 in self.seqs:
            self.high += 1

    def _run(self) -> None:
        for _ in range(1000):  # bounded: reconnects
            self._last_live: int | None = None
            self._last_replay = self.high
            try:
                joined_seq = self._connect()
                if self.connections == 1:
                    self.high = self.base = joined_seq  # a fresh member expects what comes after its join
                    self._last_replay = joined_seq
                while True:
                    self._on(self.peer.read(timeout=60), joined_seq)
            except (OSError, ConnectionError, AssertionError, ValueError):
                self.drops += 1
                if self.peer is not None:
                    self.peer.close()
                gevent.sleep(0.05)

    def wait_for(self, last: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.high < last and time.monotonic() < deadline:
            gevent.sleep(0.05)  # the reader greenlet fills ``seqs``; this only looks

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
        if self.peer is not None:
            self.peer.close()


class SteadySender:
    """Posts one message every ``interval`` s with an id; on any failure resumes and resends it."""

    def __init__(self, port: int, nick: str, room: str, interval: float) -> None:
        self.port, self.nick, self.room, self.interval = port, nick, room, interval
        self.acked: dict[int, float] = {}  # seq -> wall-clock time of the ack
        # (wall-clock time of the first attempt, seconds until its ack): resends included, so
        # a sender dropped by the server shows it as one slow ack, not as a gap
        self.ack_latencies: list[tuple[float, float]] = []
        self.session: str | None = None
        self.client: Client | None = None
        self.drops = 0
        self.dup_acks = 0
        self.stopping = False

    def _connect(self) -> None:
        self.client = Client("127.0.0.1", self.port)
        if self.session is not None:
            try:
                self.client.hello(resume=self.session)
                return
            except ChatError:  # bad_session: the window passed; start again under the same nick
                self.session = None
        self.session = self.client.hello(nick=self.nick)["session"]
        self.client.join(self.room)

    def run(self) -> None:
        self._connect()
        k = 0
        while not self.stopping:
            rid = f"{self.nick}-{k}"
            sent_at, started = time.time(), time.monotonic()
            for _ in range(100):  # bounded: resends of one message
                try:
                    ack = self.client.send(self.room, rid, id=rid)
                    break
                except Exception:  # noqa: BLE001 - closed, timed out, rate limited: resume, resend
                    self.drops += 1
                    self.client.close()
                    gevent.sleep(0.1)
                    try:
                        self._connect()
                    except Exception:  # noqa: BLE001
                        pass
            else:
                return
            self.dup_acks += 1 if ack.get("dup") else 0
            self.acked[ack["seq"]] = time.time()
            self.ack_latencies.append((sent_at, time.monotonic() - started))
            k += 1
            gevent.sleep(self.interval)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_steady(port: int, rooms: int = 4, senders: int = 2, readers: int = 3, interval: float = 0.2) -> None:
    """Run until a line "finish" arrives on stdin; then print one JSON line of results."""
    pid = f"{__import__('os').getpid() % 10000}"
    members: dict[str, list[SteadyReader]] = {}
    posting: dict[str, list[SteadySender]] = {}
    for r in range(rooms):
        room = f"steady{r}"
        members[room] = [SteadyReader(port, f"rd{pid}-{r}-{k}", room, "127.0.0.1") for k in range(readers)]
        for reader in members[room]:
            reader.start()
    for room, readers_ in members.items():  # every reader joined before the first message
        for reader in readers_:
            while reader.session is None or reader.connections == 0:
                gevent.sleep(0.01)
    gevent.sleep(0.2)
    for r in range(rooms):
        room = f"steady{r}"
        posting[room] = [SteadySender(port, f"sd{pid}-{r}-{k}", room, interval) for k in range(senders)]
    greenlets = [gevent.spawn(s.run) for ss in posting.values() for s in ss]
    print("ready", flush=True)
    gevent.socket.wait_read(sys.stdin.fileno())  # "finish"; meanwhile everything else runs
    sys.stdin.readline()
    for ss in posting.values():
        for s in ss:
            s.stopping = True
    gevent.joinall(greenlets, timeout=30)
    result: dict[str, Any] = {"acked": [], "missing": [], "duplicates": 0, "order_errors": 0, "reader_drops": 0,
                              "sender_drops": 0, "expired": 0, "dup_acks": 0, "acks": []}
    latencies: list[float] = []
    for room in members:
        acked = {seq: t for s in posting[room] for seq, t in s.acked.items()}
        last = max(acked, default=0)
        result["acked"] += [[room, seq, t] for seq, t in acked.items()]
        for reader in members[room]:
            reader.wait_for(last, timeout=30)
            result["missing"] += [[room, seq, acked[seq]] for seq in acked if seq not in reader.seqs]
            result["duplicates"] += reader.duplicates
            result["order_errors"] += reader.order_errors
            result["reader_drops"] += reader.drops
            result["expired"] += reader.expired
            latencies += reader.latencies
            reader.stop()
        for s in posting[room]:
            result["acks"] += [[round(t, 3), round(lat * 1000, 2)] for t, lat in s.ack_latencies]
            result["sender_drops"] += s.drops
            result["dup_acks"] += s.dup_acks
            s.close()
    result["latency_ms"] = {"p50": round(percentile(latencies, 0.5) * 1000, 1),
                            "p99": round(percentile(latencies, 0.99) * 1000, 1),
                            "max": round(max(latencies, default=0) * 1000, 1)}
    print(json.dumps(result), flush=True)
