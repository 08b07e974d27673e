"""Hostile clients and rooms (issue 11, findings 1 and 7): real `gochat serve` processes.

Each test plays the attacker at volume from one address, inside its rate limit, and checks
a victim alongside and the bound that holds: the memory broker keeps at most ``max_rooms``
rooms, a joined room always lists its joiner, a join past the caps gets ``too_many_rooms``
with nothing changed, idle rooms go after ``room_ttl``, and a room whose sequence restarted
has a new epoch, which the client library and ``gochat connect`` notice.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import gevent
from gevent.event import Event

from gochat.client import Client, ReconnectingClient
from test_cli import Terminal
from test_robustness import gget, metrics, pair, run_all, stats  # noqa: F401  (pair is a fixture)

RATE = 200  # the server's per-connection rate in these tests: requests/s ...
BURST = 100  # ... and bucket size; the attackers pace themselves to stay under both
PACE = 0.8  # the share of RATE an attacker uses, so that it never meets the limit
WINDOW = 10  # rooms per pipelined window of an attacker (3 requests each: join, msg, leave)
VICTIM_FACTOR = 5  # the victim's median round trip under attack, at most this many times its baseline ...
VICTIM_SLACK = 0.05  # ... plus this (s): a loaded 2-core machine adds a few ms whatever the server does
HEALTH_WORST = 2.0  # seconds: /health must answer within this all through the attack
DEADLINE = 10.0  # seconds for any bounded poll of /stats or /metrics
TTL = 1.0  # room_ttl in the room_ttl test ...
TTL_DEADLINE = 5 * TTL  # ... and how long after the flood every idle room must be gone


class Flooder:
    """One attacker connection: creates rooms (join, msg, leave) as fast as its rate limit allows.

    Requests go out in pipelined windows, paced by a client-side token bucket at
    ``PACE * RATE``, so the server never answers rate_limited: the limit does not help.
    Every ``joined`` is checked to list the joiner (a room that forgot itself does not).
    """

    def __init__(self, port: int, nick: str) -> None:
        self.client = Client("127.0.0.1", port)
        self.client.hello(nick=nick)
        self.nick = nick
        self.sent = 0
        self.started = time.monotonic()
        self.errors: list[dict] = []

    def _pace(self, count: int) -> None:
        """Wait until the server's bucket surely holds ``count`` more tokens."""
        ready_at = self.started + (self.sent + count - BURST / 2) / (PACE * RATE)
        if ready_at > time.monotonic():
            gevent.sleep(ready_at - time.monotonic())
        self.sent += count

    def _exchange(self, requests: list[dict]) -> dict[Any, dict]:
        self._pace(len(requests))
        for request in requests:
            self.client.send_nowait(request)
        replies: dict[Any, dict] = {}
        with gevent.Timeout(DEADLINE):
            while len(replies) < len(requests):
                message = self.client.recv()
                assert message is not None, "the server closed an attacker"
                if message["type"] in ("joined", "ack", "left", "error"):
                    replies[message["id"]] = message
        for reply in replies.values():
            if reply["type"] == "error":
                self.errors.append(reply)
            elif reply["type"] == "joined":
                assert self.nick in reply["members"], f"a joined room does not list its joiner: {reply}"
        return replies

    def churn(self, rooms: list[str]) -> None:
        """Create each room with one retained message and leave it: the server must keep or forget it."""
        for start in range(0, len(rooms), WINDOW):
            requests = []
            for room in rooms[start:start + WINDOW]:
                requests += [{"type": "join", "room": room, "id": f"j {room}"},
                             {"type": "msg", "room": room, "text": "flood", "id": f"m {room}"},
                             {"type": "leave", "room": room, "id": f"l {room}"}]
            self._exchange(requests)

    def occupy(self, rooms: list[str]) -> dict[Any, dict]:
        """Join rooms and stay: the replies by id (``j ROOM``)."""
        replies: dict[Any, dict] = {}
        for start in range(0, len(rooms), WINDOW):
            replies.update(self._exchange([{"type": "join", "room": room, "id": f"j {room}"}
                                           for room in rooms[start:start + WINDOW]]))
        return replies

    def close(self) -> None:
        self.client.close()


def health_poller(server: Any, stop: Event, answers: list[tuple[int, float]]) -> None:
    """/health every 50 ms until ``stop``: (status, seconds) of each answer."""
    while not stop.is_set():
        started = time.monotonic()
        status, _ = gget(server, "/health", timeout=HEALTH_WORST * 2)
        answers.append((status, time.monotonic() - started))
        stop.wait(0.05)


def forgotten(server: Any, reason: str) -> float:
    return metrics(server).get(f'gochat_rooms_forgotten_total{{reason="{reason}"}}', 0.0)


def wait_for(condition: Any, what: str, timeout: float = DEADLINE) -> None:
    """A bounded poll where the server offers no event: each round is one admin or chat request."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.05)


def next_msgs(client: ReconnectingClient, count: int) -> list[dict]:
    """The next ``count`` room messages the client receives (presence is skipped)."""
    got: list[dict] = []
    while len(got) < count:
        message = client.recv(timeout=DEADLINE)
        if message["type"] == "msg":
            got.append(message)
    return got


# ---------------------------------------------------------------- finding 1: room flood


def test_room_flood_keeps_the_victim_served_and_refuses_only_when_every_room_has_members(start_server, pair):
    max_rooms, per_session = 2000, 100
    s = start_server(max_rooms=max_rooms, max_rooms_per_session=per_session, rate=RATE, burst=BURST)
    victim = pair(s.port, room="pair")
    victim.start(30, 0.01)
    victim.check(limit=HEALTH_WORST)
    baseline = statistics.median(victim.latencies)

    # Sessions hold most rooms (members keep a room from being forgotten) ...
    occupants = [Flooder(s.port, f"occupant{i}") for i in range(max_rooms // per_session)]
    held = [[f"{o.nick}-k{k}" for k in range(per_session)] for o in occupants]
    held[-1].pop()  # with the victim's room, max_rooms in all
    run_all(lambda job: job[0].occupy(job[1]), list(zip(occupants[:-1], held[:-1])), timeout=60)

    # ... while 30 connections from the same address churn three times max_rooms rooms, each
    # left with history: at the cap every new room forgets the least recently used idle one.
    flooders = [Flooder(s.port, f"flood{i}") for i in range(30)]
    rooms_each = 3 * max_rooms // len(flooders)
    stop, answers = Event(), []
    poller = gevent.spawn(health_poller, s, stop, answers)
    victim.start(100, 0.02)
    started = time.monotonic()
    run_all(lambda f: f.churn([f"{f.nick}-r{k}" for k in range(rooms_each)]), flooders, timeout=60)
    flood_seconds = time.monotonic() - started
    victim.check(limit=HEALTH_WORST)
    stop.set()
    poller.join()
    assert [f.errors for f in flooders] == [[]] * len(flooders), "an attacker met a limit it should not"
    under_attack = statistics.median(victim.latencies)
    print(f"flood: {len(flooders) * rooms_each} rooms in {flood_seconds:.1f} s; victim median "
          f"{baseline * 1000:.1f} ms before, {under_attack * 1000:.1f} ms under attack; "
          f"/health worst {max(seconds for _, seconds in answers) * 1000:.0f} ms")
    assert under_attack <= VICTIM_FACTOR * baseline + VICTIM_SLACK, (baseline, under_attack)
    assert answers and all(status == 200 for status, _ in answers)
    assert max(seconds for _, seconds in answers) < HEALTH_WORST, answers

    # The last occupant takes the last free places, forgetting the idle rooms; then every
    # room has members, a new room is refused, and nothing changes.
    occupants[-1].occupy(held[-1])
    assert [o.errors for o in occupants] == [[]] * len(occupants)
    assert stats(s)["rooms"] == max_rooms
    late = Flooder(s.port, "late")
    replies = late.occupy(["one-room-too-many"])
    assert replies["j one-room-too-many"]["code"] == "too_many_rooms"
    assert late.client.who("one-room-too-many") == []
    assert late.client.join("occupant0-k0")["members"][-1] == "late"  # an existing room: no new one
    assert stats(s)["rooms"] == max_rooms
    assert forgotten(s, "lru") == len(flooders) * rooms_each  # every churned room, none with a member
    victim.start(10, 0.01)
    victim.check(limit=HEALTH_WORST)
    for f in flooders + occupants + [late]:
        f.close()


# ---------------------------------------------------------------- finding 7: seq reuse


def test_a_forgotten_room_comes_back_with_a_new_epoch(start_server, chat):
    max_rooms = 300
    s = start_server(max_rooms=max_rooms, rate=RATE, burst=BURST)
    alice = chat(s.port, "alice")
    first = alice.join("quiet")
    acks = [alice.send("quiet", f"old {k}", id=f"old{k}") for k in range(5)]
    assert [a["seq"] for a in acks] == [1, 2, 3, 4, 5]
    alice.leave("quiet")

    # A churn of max_rooms new rooms pushes the quiet room out: least recently used, no members.
    flooders = [Flooder(s.port, f"churn{i}") for i in range(10)]
    run_all(lambda f: f.churn([f"{f.nick}-r{k}" for k in range(max_rooms // len(flooders))]), flooders)
    assert alice.history("quiet") == []

    again = alice.join("quiet")
    assert (again["seq"], again["first_seq"]) == (0, 1)
    assert again.get("epoch") != first.get("epoch"), "the sequence restarted under the same epoch"
    ack = alice.send("quiet", "new 1", id="new1")
    assert ack["seq"] == 1  # seqs restart, but in another epoch: (epoch, seq) never repeats
    listed = {r["room"]: r for r in alice.rooms()}
    assert listed["quiet"]["epoch"] == again["epoch"]
    assert alice.join("quiet")["epoch"] == again["epoch"]  # re-joining a kept room keeps its epoch

    # A client that saved (old epoch, 5) re-joins with since=5: the since is void, and it gets
    # the new epoch's message, which a since of 5 would have skipped.
    bob = chat(s.port, "bob")
    joined = bob.join("quiet", since=5, epoch=first["epoch"])
    assert joined["epoch"] == again["epoch"]
    got = bob.expect("msg", room="quiet")
    assert (got["seq"], got["text"]) == (1, "new 1")
    for f in flooders:
        f.close()


def test_the_client_library_drops_a_stale_since_after_a_reconnect(start_server, chat):
    """ReconnectingClient: its session expired, its room was forgotten and came back with new
    messages; after the reconnect it gets each of them once, in order, from seq 1."""
    max_rooms = 200
    s = start_server(max_rooms=max_rooms, rate=RATE, burst=BURST, resume_window=0)
    writer = chat(s.port, "writer", room="news")
    reader = ReconnectingClient([("127.0.0.1", s.port)], nick="reader", timeout=5)
    old_epoch = reader.join("news").get("epoch")
    for k in range(3):
        writer.send("news", f"old {k}")
    assert [(m["seq"], m["text"]) for m in next_msgs(reader, 3)] == [(1, "old 0"), (2, "old 1"), (3, "old 2")]
    assert reader.rooms["news"] == 3
    writer.leave("news")
    reader.client.close()  # resume_window 0: the session ends, the room has no member left
    wait_for(lambda: writer.who("news") == [], "the reader's session to end")

    flooders = [Flooder(s.port, f"churn{i}") for i in range(10)]
    run_all(lambda f: f.churn([f"{f.nick}-r{k}" for k in range(max_rooms // len(flooders))]), flooders)
    assert writer.history("news") == []
    new_epoch = writer.join("news").get("epoch")
    assert new_epoch != old_epoch, "the sequence restarted under the same epoch"
    for k in range(4):
        writer.send("news", f"new {k}")

    got = [(m["seq"], m["text"]) for m in next_msgs(reader, 1)]  # the reconnect happens in there
    assert got == [(1, "new 0")], "the stale since skipped the new epoch's first messages"
    got += [(m["seq"], m["text"]) for m in next_msgs(reader, 3)]
    assert got == [(1, "new 0"), (2, "new 1"), (3, "new 2"), (4, "new 3")]
    assert reader.restarted == ["news"] and reader.epochs["news"] == new_epoch
    assert reader.rooms["news"] == 4
    writer.send("news", "live")
    assert [m["seq"] for m in next_msgs(reader, 1)] == [5]  # nothing twice: the next one is live
    reader.close()
    for f in flooders:
        f.close()


# ---------------------------------------------------------------- the per-session cap and room_ttl


def test_max_rooms_per_session_refuses_with_nothing_changed(start_server, chat, pair):
    per_session = 5
    s = start_server(max_rooms_per_session=per_session, rate=RATE, burst=BURST)
    victim = pair(s.port, room="pair")
    victim.start(20, 0.01)
    victim.check(limit=HEALTH_WORST)
    baseline = statistics.median(victim.latencies)

    # 40 sessions from one address each try three times their share of rooms.
    flooders = [Flooder(s.port, f"hoard{i}") for i in range(40)]
    victim.start(40, 0.02)
    replies = run_all(lambda f: f.occupy([f"{f.nick}-{k}" for k in range(3 * per_session)]), flooders)
    victim.check(limit=HEALTH_WORST)
    assert statistics.median(victim.latencies) <= VICTIM_FACTOR * baseline + VICTIM_SLACK
    for flooder, got in zip(flooders, replies):
        kinds = [got[f"j {flooder.nick}-{k}"].get("code", "joined") for k in range(3 * per_session)]
        assert kinds == ["joined"] * per_session + ["too_many_rooms"] * 2 * per_session
    assert stats(s)["rooms"] == 1 + 40 * per_session

    one = flooders[0]
    refused = f"{one.nick}-{per_session}"
    assert one.client.who(refused) == []  # no membership, no presence, no room left behind
    assert one.client.join(f"{one.nick}-0")["room"] == f"{one.nick}-0"  # re-joining is not a new room
    one.client.leave(f"{one.nick}-0")
    assert one.client.join(refused)["members"] == [one.nick]
    for f in flooders:
        f.close()


def test_room_ttl_forgets_idle_rooms_and_gochat_connect_tells(start_server, chat):
    s = start_server(room_ttl=TTL, rate=RATE, burst=BURST)
    assert forgotten(s, "ttl") == 0  # exported at zero from the start
    keeper = chat(s.port, "keeper", room="kept")
    keeper.send("kept", "still here")
    term = Terminal(f"127.0.0.1:{s.port}", "--nick", "tess", "--room", "lobby")
    try:
        term.wait_for("* joined lobby")
        term.type("/join brief")
        term.wait_for("* joined brief")
        term.type("a message to remember")
        term.wait_for("[brief] tess: a message to remember")
        term.type("/leave brief")
        term.wait_for("* left brief")

        flooders = [Flooder(s.port, f"idle{i}") for i in range(10)]
        run_all(lambda f: f.churn([f"{f.nick}-r{k}" for k in range(30)]), flooders)
        # Idle rooms expire in the order they went idle: each flooder's last room going means all went.
        wait_for(lambda: all(f.client.history(f"{f.nick}-r29") == [] for f in flooders),
                 "the idle rooms to expire", timeout=TTL_DEADLINE)
        assert all(f.client.history(f"{f.nick}-r0") == [] for f in flooders)
        assert forgotten(s, "ttl") == 10 * 30 + 1  # the flood's rooms and the terminal's
        for f in flooders:
            f.close()
        assert keeper.history("kept")[0]["text"] == "still here"  # a room with a member never expires
        assert keeper.send("kept", "and on")["seq"] == 2
        assert {r["room"] for r in keeper.rooms()} == {"kept", "lobby"}

        term.type("/join brief")
        term.wait_for("* history of brief restarted")
        term.type("/quit")
        assert term.proc.wait(10) == 0
    finally:
        term.close()
