"""Hostile clients against the Redis broker: what they can make Redis keep, and what that costs others.

Each test starts its own ``redis-server`` (conftest's ``redis_server``, never the shared one)
and real ``gochat serve`` processes on it, plays the attacker at volume, and checks the bound
in Redis itself (keys, index, hash fields) beside a victim that keeps being served.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from typing import Any

import gevent
import pytest
import redis
from gevent.event import Event

from test_robustness import FAST, Peer, no_tracebacks, pair, run_all, unique_nick  # noqa: F401 (pair: fixture)
from test_redis import until

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

PRESENCE_TTL = 1  # seconds: the shortest allowed, so that TTLs derived from it run out within a test
ROOM_TTL = 2  # seconds: dead rooms vanish from Redis within the test
DEAD_ROOMS = 1500  # created, posted to and left by the attacker
FLOODERS = 8  # attacker connections sharing them
LIVE_ROOMS = 20  # rooms that keep a member throughout
VICTIM_EXCHANGES = 150  # healthy-pair round trips per measurement
ROOMS_CALLS = 400  # at most, per measurement: the `rooms` loop stops with the victim anyway
KEYS_DEADLINE = 15.0  # seconds for Redis to drop the dead rooms' keys (TTL ROOM_TTL, then expiry)
# The victim's ack p50 and the cost of `rooms` after the flood may exceed their baseline of
# the same test by this factor plus this slack (a loaded 2-core machine; the old unbounded
# index made them 12-25 times worse at DEAD_ROOMS: `rooms` 1.7 -> 40 ms, victim 3 -> 43 ms).
SLOWDOWN_FACTOR = 3
SLOWDOWN_SLACK = 0.010


def store(redis_server: Any) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url, decode_responses=True)


def room_keys(r: redis.Redis) -> set[str]:
    """Every per-room key left in Redis (SCAN skips keys whose TTL ran out, DBSIZE would not)."""
    return set(r.scan_iter(match="gochat:room:*", count=1000))


def largest_room_collection(r: redis.Redis) -> tuple[int, str]:
    """(elements, key) of the biggest set, sorted set, hash or list about rooms (streams are
    capped at history_size): an index that is never trimmed shows here, whatever its name."""
    sizes = {"set": r.scard, "zset": r.zcard, "hash": r.hlen, "list": r.llen}
    biggest = (0, "")
    for key in r.scan_iter(match="gochat:room*", count=1000):
        size = sizes.get(r.type(key))
        if size is not None:
            biggest = max(biggest, (size(key), key))
    return biggest


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- the rooms flood


def churn_rooms(port: int, names: list[str]) -> int:
    """One attacker connection: join, post to and leave each room; the acked seqs' sum."""
    peer = Peer(port, timeout=15)
    peer.hello(unique_nick("churn"))
    acked = 0
    for name in names:
        peer.send_raw(b"".join(peer.encode(request) for request in (
            {"type": "join", "room": name}, {"type": "msg", "room": name, "text": "x", "id": name},
            {"type": "leave", "room": name})))
        acked += peer.expect("ack", timeout=15)["seq"]
        peer.expect("left", room=name, timeout=15)
    peer.close()
    return acked


def loop_rooms(port: int, stop: Event, durations: list[float]) -> list[dict]:
    """The hostile reader: `rooms` again and again, one at a time; the last listing."""
    peer = Peer(port, timeout=15)
    peer.hello(unique_nick("lister"))
    listing: list[dict] = []
    while not stop.is_set() and len(durations) < ROOMS_CALLS:
        started = time.monotonic()
        peer.send({"type": "rooms"})
        listing = peer.expect("rooms", timeout=15)["rooms"]
        durations.append(time.monotonic() - started)
    peer.close()
    return listing


def measure(port: int, victim: Any) -> tuple[list[float], list[float], list[dict]]:
    """The victim's round trips while one client sends `rooms` in a loop; the loop's durations
    and its last listing."""
    stop, durations = Event(), []
    lister = gevent.spawn(loop_rooms, port, stop, durations)
    victim.start(VICTIM_EXCHANGES, pause=0.005)
    victim.check(limit=10.0)
    stop.set()
    listing = lister.get(timeout=20)
    return victim.latencies, durations, listing


def test_a_rooms_flood_leaves_nothing_in_redis_and_rooms_costs_only_live_rooms(start_server, redis_server, pair):
    server = start_server(broker=redis_server.url, presence_ttl=PRESENCE_TTL, room_ttl=ROOM_TTL, rate=FAST,
                          burst=FAST)
    r = store(redis_server)
    victim = pair(server.port)
    holder = Peer(server.port)
    holder.hello(unique_nick("holder"))
    live = {f"live-{k}" for k in range(LIVE_ROOMS)}
    for name in sorted(live):
        holder.send({"type": "join", "room": name})
        holder.expect("joined", room=name)
        holder.send({"type": "msg", "room": name, "text": "kept", "id": name})
        holder.expect("ack", id=name)
    live.add("pair")

    base_victim, base_rooms, base_listing = measure(server.port, victim)
    assert {entry["room"] for entry in base_listing} == live

    started = time.monotonic()
    names = [f"dead-{k}" for k in range(DEAD_ROOMS)]
    acked = run_all(lambda k: churn_rooms(server.port, names[k::FLOODERS]), range(FLOODERS), timeout=60)
    flood_s = time.monotonic() - started
    assert sum(acked) == DEAD_ROOMS, "every dead room's message was acked as its seq 1"

    after_victim, after_rooms, listing = measure(server.port, victim)
    print(f"\nflood: {DEAD_ROOMS} rooms in {flood_s:.1f} s; rooms call p50 {pct(base_rooms, .5) * 1000:.1f} -> "
          f"{pct(after_rooms, .5) * 1000:.1f} ms ({len(base_rooms)} / {len(after_rooms)} calls); victim ack p50 "
          f"{pct(base_victim, .5) * 1000:.1f} -> {pct(after_victim, .5) * 1000:.1f} ms, p99 "
          f"{pct(base_victim, .99) * 1000:.1f} -> {pct(after_victim, .99) * 1000:.1f} ms")
    by_room = {entry["room"]: entry for entry in listing}
    assert set(by_room) == live, "rooms lists exactly the rooms with members"
    assert by_room["pair"]["members"] == 2 and by_room["live-0"]["seq"] == 1
    assert statistics.median(after_rooms) <= SLOWDOWN_FACTOR * statistics.median(base_rooms) + SLOWDOWN_SLACK, \
        "rooms costs more with dead rooms around"
    assert pct(after_victim, .5) <= SLOWDOWN_FACTOR * pct(base_victim, .5) + SLOWDOWN_SLACK, \
        "the victim's acks slowed down while rooms was listed"
    assert all(entry.get("epoch") not in (None, "0") for entry in listing), "rooms carries each room's epoch"

    def only_live_keys() -> set[str] | None:
        keys = room_keys(r)
        return keys if all(key.split(":")[2] in live for key in keys) else None

    kept = until(only_live_keys, KEYS_DEADLINE, "the dead rooms' keys expired")
    biggest = largest_room_collection(r)
    print(f"room keys left {len(kept)}, dbsize {r.dbsize()}, largest room collection {biggest}")
    assert len(kept) <= 3 * len(live)  # pos, log and members of each live room
    assert r.zcard("gochat:rooms:live") == len(live), "the live index holds only rooms with members"
    assert biggest[0] <= len(live), f"an index grew with the dead rooms: {biggest}"
    no_tracebacks(server)


# ---------------------------------------------------------------- DM ack records


DMS = 1100  # past the 1024 acks the protocol keeps
DM_WINDOW = 50  # DMs in flight at once


def test_dm_ack_records_are_trimmed_to_the_last_1024(start_server, redis_server):
    a, b = (start_server(broker=redis_server.url, presence_ttl=PRESENCE_TTL, rate=FAST, burst=FAST, dm_rate=0)
            for _ in range(2))
    r = store(redis_server)
    inbox = Peer(b.port)
    inbox.hello("inbox")
    sender = Peer(a.port)
    session = sender.hello("dmflood")["session"]
    for start in range(0, DMS, DM_WINDOW):
        ids = range(start, min(DMS, start + DM_WINDOW))
        sender.send_raw(b"".join(sender.encode({"type": "dm", "to": "inbox", "text": f"d{k}", "id": f"d{k}"})
                                 for k in ids))
        for k in ids:
            assert "dup" not in sender.expect("ack", id=f"d{k}")
    assert [inbox.expect("dm")["text"] for _ in range(DMS)] == [f"d{k}" for k in range(DMS)]

    acks, ackids = f"gochat:session:{session}:acks", f"gochat:session:{session}:ackids"
    print(f"\nafter {DMS} DMs: {r.hlen(acks)} ack fields, {r.llen(ackids)} ack ids")
    assert r.llen(ackids) == 1024 and r.hlen(acks) == 1024
    last = {json.dumps(f"d{k}") for k in range(DMS - 1024, DMS)}
    assert set(r.lrange(ackids, 0, -1)) == set(r.hkeys(acks)) == last
    assert r.ttl(acks) > 0 and r.ttl(ackids) > 0

    sender.close()
    a.wait_for_log(r"nick=dmflood reason=peer_closed")
    moved = Peer(b.port)
    moved.send({"type": "hello", "resume": session})
    assert moved.expect("welcome")["nick"] == "dmflood"
    moved.send({"type": "dm", "to": "inbox", "text": "again", "id": f"d{DMS - 1}"})
    assert moved.expect("ack")["dup"] is True, "the last acks followed the session to another node"
    moved.send({"type": "dm", "to": "inbox", "text": "oldest", "id": "d0"})
    assert "dup" not in moved.expect("ack", id="d0"), "an ack older than the last 1024 is forgotten"
    assert inbox.expect("dm")["text"] == "oldest", "the victim got each DM once"
    assert r.llen(ackids) == 1024 and r.hlen(acks) == 1024
    no_tracebacks(a)
    no_tracebacks(b)


# ---------------------------------------------------------------- epochs


def next_msgs(client: Any, count: int) -> list[tuple[int, str]]:
    """(seq, text) of the next ``count`` msgs a client receives, whatever else comes between."""
    got = []
    while len(got) < count:
        message = client.recv(timeout=5)
        assert message is not None, f"no msg after {got}"
        if message["type"] == "msg":
            got.append((message["seq"], message["text"]))
    return got


def test_a_lost_or_expired_room_sequence_restarts_with_a_new_epoch(start_server, redis_server, chat):
    a, b = (start_server(broker=redis_server.url, presence_ttl=PRESENCE_TTL, room_ttl=1, rate=FAST, burst=FAST)
            for _ in range(2))
    r = store(redis_server)
    c, d = chat(a.port, "cee"), chat(b.port, "dee")
    first = c.join("ep")
    assert d.join("ep").get("epoch") == first.get("epoch") not in (None, "0")
    assert [d.send("ep", f"m{k}")["seq"] for k in range(3)] == [1, 2, 3]
    for client in (c, d):
        assert [client.expect("msg", room="ep")["seq"] for _ in range(3)] == [1, 2, 3]

    # The sequence is lost while both stay members (a failover to a replica that lagged, an eviction).
    lost = [key for key in room_keys(r) if key.startswith("gochat:room:ep:") and not key.endswith(":members")]
    assert lost and r.delete(*lost) == len(lost)
    assert [d.send("ep", f"after{k}")["seq"] for k in range(2)] == [1, 2]
    for client in (c, d):  # both nodes deliver the new epoch's seqs, though they had seen 3
        assert next_msgs(client, 2) == [(1, "after0"), (2, "after1")]
    second = c.join("ep")
    assert (second["seq"], second["first_seq"]) == (2, 1) and second["epoch"] not in (first["epoch"], "0")
    assert {e["room"]: (e["seq"], e["epoch"]) for e in d.rooms()}["ep"] == (2, second["epoch"])

    # The room expires: no members and no new message for room_ttl.
    c.leave("ep")
    d.leave("ep")
    until(lambda: not any(key.startswith("gochat:room:ep:") for key in room_keys(r)), 10,
          "the room's keys expired")
    third = c.join("ep")
    assert (third["seq"], third["first_seq"]) == (0, 1)
    assert third["epoch"] not in (first["epoch"], second["epoch"], "0")
    assert c.history("ep") == []
    assert c.send("ep", "fresh")["seq"] == 1
    no_tracebacks(a)
    no_tracebacks(b)


def test_room_ttl_0_keeps_a_room_with_history_forever_but_no_index_entry(start_server, redis_server, chat):
    node = start_server(broker=redis_server.url, presence_ttl=PRESENCE_TTL, room_ttl=0)
    r = store(redis_server)
    c = chat(node.port, "keeper")
    epoch = c.join("kept").get("epoch")
    c.send("kept", "stays")
    c.join("quiet")
    c.leave("kept")
    c.leave("quiet")
    assert r.ttl("gochat:room:kept:pos") == r.ttl("gochat:room:kept:log") == -1, "room_ttl 0: no TTL"
    assert not any(key.startswith("gochat:room:quiet:") for key in room_keys(r)), \
        "a room that retains nothing is forgotten with its last member"
    assert r.zcard("gochat:rooms:live") == 0 and largest_room_collection(r)[0] <= 2
    assert c.rooms() == []
    again = c.join("kept")
    assert (again.get("epoch"), again["seq"]) == (epoch, 1)
    assert [m["text"] for m in c.history("kept")] == ["stays"]
