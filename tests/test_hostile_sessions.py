"""Hostile clients within their limits, against sessions: ghosts, DM floods, forged resume values.

Each test plays the attacker at volume on real ``gochat serve`` processes, measures a victim
beside it, and checks the bound of PROTOCOL.md section 6 that protects the victim:
``max_sessions`` (sessions awaiting resume), ``dm_rate`` / ``dm_burst`` (DMs to one
recipient, from all senders and all nodes together) and the check of resume values.
"""
from __future__ import annotations

import json
import secrets
import shutil
import socket
import time

import gevent
import pytest
from gevent.event import Event

from test_robustness import FAST, Observer, Peer, metrics, no_tracebacks, run_all, stats
from test_robustness import pair  # noqa: F401 -- a fixture: pytest looks it up in this module

GHOST_ROOM = "haunted"


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


# ---------------------------------------------------------------- ghost sessions


def ghost(port: int, nick: str) -> None:
    """One cycle of the attack: connect, hello, join, close without bye (the session waits to be resumed)."""
    p = Peer(port)
    try:
        p.hello(nick)
        p.send({"type": "join", "room": GHOST_ROOM, "id": "j"})
        p.expect("joined", id="j")
    finally:
        p.close()


def test_ghost_sessions_are_capped_oldest_first_and_free_their_nicks(start_server, chat, pair):
    max_connections, max_sessions, cycles, concurrency = 20, 40, 400, 8
    s = start_server(max_connections=max_connections, max_sessions=max_sessions, resume_window=60,
                     rate=FAST, burst=FAST)
    observer = Observer(chat(s.port, "observer"), [GHOST_ROOM])
    victim = pair(s.port, room=GHOST_ROOM)  # alice and bob, chatting in the haunted room
    live = 3  # observer, alice, bob
    victim.start(20, pause=0.01)
    victim.check(limit=2.0)
    baseline = victim.latencies
    rss_before = stats(s)["rss_bytes"]

    peak, done = 0, Event()

    def sample() -> None:  # /stats while the attack runs, every 50 ms: the cap must hold throughout
        nonlocal peak
        while not done.is_set():
            peak = max(peak, stats(s)["sessions_awaiting_resume"])
            done.wait(0.05)

    sampler = gevent.spawn(sample)
    victim.start(80, pause=0.02)
    nicks = [f"ghost{i}" for i in range(cycles)]
    try:
        run_all(lambda nick: ghost(s.port, nick), nicks, concurrency=concurrency, timeout=60)
    finally:
        done.set()
        sampler.join()
    victim.check(limit=2.0)
    # The victim keeps chatting: its round trips stay near its own baseline.
    assert median(victim.latencies) < max(5 * median(baseline), median(baseline) + 0.05), (baseline, victim.latencies)

    # Every ghost's connection is gone once the server has read each close (no event says
    # when: a bounded poll). Sessions stay at the cap: the live ones and the newest ghosts.
    deadline = time.monotonic() + 10
    while (now := stats(s))["connections"] > live and time.monotonic() < deadline:
        gevent.sleep(0.05)
    print(f"\n{cycles} ghost cycles: awaiting resume {now['sessions_awaiting_resume']} (peak seen {peak}), "
          f"sessions {now['sessions']}, rss {rss_before / 2**20:.1f} -> {now['rss_bytes'] / 2**20:.1f} MiB")
    assert peak <= max_sessions
    assert now["connections"] == live
    assert now["sessions"] == max_sessions
    assert now["sessions_awaiting_resume"] == max_sessions - live
    members = observer.client.who(GHOST_ROOM)
    assert len(members) == max_sessions

    # The oldest ghosts went offline (their rooms were told), the newest still wait.
    evicted = cycles - (max_sessions - live)
    observer.wait_all_offline(set(nicks[:evicted - concurrency]), timeout=10)
    deadline = time.monotonic() + 5
    while len(observer.offline) < evicted and time.monotonic() < deadline:
        gevent.sleep(0.02)  # the observer greenlet records presence; this only looks
    assert len(observer.offline) == evicted
    assert not observer.offline & set(nicks[-(max_sessions - live - concurrency):])
    assert set(members) == {"observer", "alice", "bob"} | (set(nicks) - observer.offline)

    # An evicted ghost's nick is free again, and its session cannot come back.
    again = chat(s.port, "ghost0")
    assert again.nick == "ghost0"
    assert metrics(s)["gochat_sessions_ended_at_cap_total"] == evicted + 1  # ghost0's welcome made room once more
    no_tracebacks(s)


# ---------------------------------------------------------------- DM flood

DM_TEXT = "\U0001F600" * 4096  # 4096 code points (the text limit), 16 KiB of UTF-8
DM_RATE, DM_BURST = 4, 8
FLOOD_SECONDS = 3.0
SENDER_PACE = 1 / 15  # seconds between a sender's DMs: inside its own rate (20/s)
READ_CHUNK, READ_PAUSE = 2048, 0.016  # the victim reads about 128 KiB/s


class SlowReader:
    """The victim: reads a small chunk, pauses, reads again, counting the DMs it has received.

    At ~128 KiB/s it keeps up with ``DM_RATE`` 16 KiB DMs a second (64 KiB/s), not with
    several senders at their own rate limits (~240 KiB/s each).
    """

    def __init__(self, port: int, nick: str) -> None:
        self.peer = Peer(port, rcvbuf=16384)
        self.peer.hello(nick)
        self.opened = time.monotonic()
        self.dms = 0
        self.pongs: list[int] = []
        self.closed_after: float | None = None
        self.buf = b""
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        sock = self.peer.sock
        sock.settimeout(30)
        while True:
            try:
                chunk = sock.recv(READ_CHUNK)
            except (ConnectionResetError, socket.timeout):
                chunk = b""
            if not chunk:
                self.closed_after = time.monotonic() - self.opened
                return
            self.buf += chunk
            *lines, self.buf = self.buf.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if message["type"] == "dm":
                    self.dms += 1
                elif message["type"] == "pong":
                    self.pongs.append(message["ts"])
            gevent.sleep(READ_PAUSE)

    def caught_up(self, timeout: float = 15.0) -> bool:
        """Ping and wait for the pong: it comes after every DM already queued for the victim."""
        ts = len(self.pongs) + 1
        try:
            self.peer.send({"type": "ping", "ts": ts})
        except OSError:
            self.greenlet.join(timeout)  # closed by the server: read what it sent, up to the end
            return False
        deadline = time.monotonic() + timeout
        while ts not in self.pongs and self.closed_after is None and time.monotonic() < deadline:
            gevent.sleep(0.02)  # the reader greenlet records the pong; this only looks
        return ts in self.pongs


def dm_sender(port: int, nick: str, victim: str, until: float) -> tuple[int, int]:
    """Big DMs to ``victim`` at a steady pace inside this connection's rate: (acks, rate_limited)."""
    p = Peer(port)
    acks = limited = 0
    try:
        p.hello(nick)
        k = 0
        while time.monotonic() < until:
            p.send({"type": "dm", "to": victim, "text": DM_TEXT, "id": k})
            reply = p.reply(timeout=10)
            if reply["type"] == "ack":
                acks += 1
            elif reply["code"] == "no_such_user":
                break  # the victim was dropped: the attack has won
            else:
                assert reply["code"] == "rate_limited", reply
                limited += 1
            k += 1
            gevent.sleep(SENDER_PACE)
    except ConnectionError:
        pass  # closed after max_strikes refused DMs in a row: allowed, and checked separately
    finally:
        p.close()
    return acks, limited


def striker(port: int, victim: str, count: int) -> list[dict]:
    """A client that only sends DMs the victim's budget refuses, all at once: what it gets until closed."""
    p = Peer(port)
    try:
        p.hello("striker")
        p.send_raw(b"".join(p.encode({"type": "dm", "to": victim, "text": "x", "id": k}) for k in range(count)))
        return p.drain(timeout=5)
    finally:
        p.close()


def flood_dms(servers: list, victim: SlowReader, senders: int) -> tuple[int, int, float]:
    """``senders`` connections spread over ``servers`` flood the victim: (acks, rate_limited, seconds)."""
    started = time.monotonic()
    until = started + FLOOD_SECONDS
    jobs = [(servers[k % len(servers)].port, f"sender{k}") for k in range(senders)]
    results = run_all(lambda job: dm_sender(job[0], job[1], "victim", until), jobs, timeout=30)
    return sum(a for a, _ in results), sum(r for _, r in results), time.monotonic() - started


def check_dm_flood(servers: list, victim: SlowReader, acks: int, limited: int, seconds: float) -> None:
    survived = victim.caught_up()
    closes = [line.strip() for server in servers for line in server.lines if "nick=victim reason=" in line]
    if survived:
        state = "alive and caught up"
    elif victim.closed_after is None:
        state = "still behind its backlog 15 s after the flood"
    else:
        state = f"closed after {victim.closed_after:.1f} s"
    print(f"\nDM flood over {seconds:.1f} s: {victim.dms} DMs received, {acks} acked, {limited} rate_limited; "
          f"victim {state} {closes}")
    assert survived and not closes, (state, closes)
    assert limited > 0
    deadline = time.monotonic() + 5  # with Redis, a DM acked on the other node may still be in pub/sub
    while victim.dms < acks and time.monotonic() < deadline:
        gevent.sleep(0.02)  # the reader greenlet counts; this only looks
    assert victim.dms == acks  # every acked DM arrived, nothing else did
    assert acks <= DM_BURST + DM_RATE * seconds + 2  # one budget for all senders (and all nodes)


def test_a_dm_flood_from_many_senders_cannot_drop_a_slow_reader(start_server):
    s = start_server(dm_rate=DM_RATE, dm_burst=DM_BURST, max_outbound_bytes=262144, max_strikes=20)
    victim = SlowReader(s.port, "victim")
    acks, limited, seconds = flood_dms([s], victim, senders=6)
    check_dm_flood([s], victim, acks, limited, seconds)
    # A refused DM is a strike like any limited request: max_strikes in a row close.
    got = striker(s.port, "victim", DM_BURST + 20 + 4)
    errors = [m for m in got if m["type"] == "error"]
    assert all(e["code"] == "rate_limited" for e in errors) and len(errors) >= 20, got[-3:]
    assert errors[-1]["message"] == "closed after 20 limited requests in a row"
    s.wait_for_log(r"nick=striker reason=rate_limited")
    assert victim.caught_up()
    # A DM to a nick nobody holds is no_such_user, whatever the victim's budget.
    p = Peer(s.port)
    p.hello("asker")
    p.send({"type": "dm", "to": "nobody", "text": "hi", "id": 1})
    assert p.reply()["code"] == "no_such_user"
    p.close()
    no_tracebacks(s)


needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@needs_redis
def test_senders_on_two_nodes_share_one_recipient_budget(start_server, redis_server):
    a, b = (start_server(broker=redis_server.url, presence_ttl=2, dm_rate=DM_RATE, dm_burst=DM_BURST,
                         max_outbound_bytes=262144, max_strikes=1000) for _ in range(2))
    victim = SlowReader(a.port, "victim")
    acks, limited, seconds = flood_dms([a, b], victim, senders=6)
    check_dm_flood([a, b], victim, acks, limited, seconds)
    no_tracebacks(a)
    no_tracebacks(b)


# ---------------------------------------------------------------- forged resume values


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def broker_url(request) -> str:
    if request.param == "memory":
        return "memory"
    return request.getfixturevalue("redis_server").url


def test_forged_resume_values_get_bad_session_and_the_connection_stays(start_server, broker_url):
    s = start_server(broker=broker_url, rate=FAST, burst=FAST)
    owner = Peer(s.port)
    own = owner.hello("owner")["session"]
    owner.send({"type": "join", "room": "keep", "id": "j"})
    owner.expect("joined", id="j")
    owner.send({"type": "msg", "room": "keep", "text": "before", "id": "m1"})  # an ack record for the session
    owner.expect("ack", id="m1")
    forged = [own + ":ackids", own + ":acks", own + ":", own[:-1], own + "A", "x" * 10_000, "\u2603" * 32,
              "\u00e9" * 32, "", " " * 32, "*", "gochat:rooms", "../" * 11 + "ab", "\x00" * 32,
              secrets.token_urlsafe(24)]  # well formed, but never issued
    attacker = Peer(s.port)
    for k, value in enumerate(forged):
        attacker.send({"type": "hello", "resume": value, "id": k})
        reply = attacker.reply()
        assert (reply["type"], reply.get("code"), reply.get("id")) == ("error", "bad_session", k), (value[:40], reply)
    assert attacker.hello("attacker")["nick"] == "attacker"  # the connection stayed, and can start a session
    # Room names that end like the suffixes of key names are rooms like any other.
    for room in ("keep:acks", "keep:log", "keep:seq", "keep:members"):
        attacker.send({"type": "join", "room": room, "id": room})
        assert attacker.reply()["type"] == "joined"
        attacker.send({"type": "msg", "room": room, "text": "x", "id": "m" + room})
        assert attacker.reply()["seq"] == 1
    attacker.send({"type": "dm", "to": own + ":ackids", "text": "x", "id": "d"})
    assert attacker.reply()["code"] == "no_such_user"
    # The real owner is untouched: it resumes its session with the real value.
    owner.close()
    s.wait_for_log(r"nick=owner reason=")
    back = Peer(s.port)
    back.send({"type": "hello", "resume": own})
    assert back.expect("welcome")["nick"] == "owner"
    back.send({"type": "msg", "room": "keep", "text": "before", "id": "m1"})
    assert back.expect("ack", id="m1").get("dup") is True
    attacker.close()
    back.close()
    no_tracebacks(s)
