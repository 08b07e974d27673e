"""Several gochat nodes as one service through a real `redis-server` each test starts itself."""
from __future__ import annotations

import os
import shutil
import signal
import time

import gevent
import pytest

from gochat.client import ChatError

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

PRESENCE_TTL = 1.0  # short, so that a dead node's members vanish within the test


@pytest.fixture
def nodes(start_server, redis_server):
    """Start n gochat nodes on one Redis."""
    def start(n: int, **settings):
        return [start_server(broker=redis_server.url, presence_ttl=PRESENCE_TTL, rate=100000, burst=100000,
                             **settings) for _ in range(n)]
    return start


def until(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll for state that no event announces (a TTL running out); bounded, at 50 ms steps."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        gevent.sleep(0.05)


def test_three_nodes_are_one_service(nodes, chat):
    a, b, c = nodes(3)
    members = [chat(node.port, f"m{i}-{k}", room="big") for i, node in enumerate((a, b, c)) for k in range(2)]
    senders = [chat(node.port, f"s{i}-{k}", room="big") for i, node in enumerate((a, b)) for k in range(2)]
    per_sender = 50

    def blast(client, k):
        for n in range(per_sender):
            client.send("big", f"{k}:{n}")

    gevent.joinall([gevent.spawn(blast, s, k) for k, s in enumerate(senders)], raise_error=True)
    total = per_sender * len(senders)
    for client in members + senders:
        seqs = [client.expect("msg", room="big")["seq"] for _ in range(total)]
        assert seqs == list(range(1, total + 1)), "every member gets every message once, in seq order"
    for client in members:
        assert client.inbox.empty() or all(m["type"] == "presence" for m in list(client.inbox.queue))
    expected = sorted(m.nick for m in members + senders)
    for node in (a, b, c):
        viewer = chat(node.port, f"view-{node.port}")
        assert sorted(viewer.who("big")) == expected
        assert {r["room"]: (r["members"], r["seq"]) for r in viewer.rooms()}["big"] == (len(expected), total)
    taken = chat(c.port)
    with pytest.raises(ChatError) as err:
        taken.hello(nick="M0-0")  # taken on node A, case-insensitively
    assert err.value.code == "nick_taken"


def test_resume_on_another_node_gets_what_it_missed(nodes, chat):
    a, b, c = nodes(3)
    peer = chat(b.port, "peer", room="r")
    mover = chat(a.port, "mover", room="r")
    first = mover.send("r", "before", id="keep")
    seen = mover.expect("msg", room="r")["seq"]
    session = mover.session
    mover.close()
    a.wait_for_log(r"nick=mover reason=peer_closed")
    missed = [peer.send("r", f"missed{k}")["seq"] for k in range(3)]
    moved = chat(c.port)
    assert moved.hello(resume=session)["nick"] == "mover"
    moved.join("r", since=seen)
    assert [moved.expect("msg", room="r")["seq"] for _ in range(3)] == missed
    assert moved.send("r", "before", id="keep") == {**first, "dup": True}  # the ack followed the session
    peer.send("r", "live")
    assert moved.expect("msg", room="r")["text"] == "live"
    assert sorted(peer.who("r")) == ["mover", "peer"]


def test_takeover_across_nodes_closes_the_old_connection(nodes, chat):
    a, b = nodes(2)
    old = chat(a.port, "twice", room="r")
    new = chat(b.port)
    assert new.hello(resume=old.session)["nick"] == "twice"
    assert old.recv(timeout=5) is None
    peer = chat(a.port, "other", room="r")
    peer.send("r", "hello again")
    assert new.expect("msg", room="r")["text"] == "hello again"


def test_killed_node_leaves_no_ghosts_and_its_users_resume_elsewhere(nodes, chat):
    a, b = nodes(2)
    victim = chat(a.port, "victim", room="r")
    watcher = chat(b.port, "watcher", room="r")
    acked = [watcher.send("r", f"m{k}")["seq"] for k in range(3)]
    seen = [victim.expect("msg", room="r")["seq"] for _ in range(3)][-1]
    session = victim.session
    a.proc.kill()  # kill -9
    a.proc.wait(10)
    until(lambda: watcher.who("r") == ["watcher"], timeout=PRESENCE_TTL * 5, what="victim gone from who")
    acked += [watcher.send("r", f"after{k}")["seq"] for k in range(2)]
    back = chat(b.port)
    assert back.hello(resume=session)["nick"] == "victim"
    back.join("r", since=seen - 3)
    assert [back.expect("msg", room="r")["seq"] for _ in range(len(acked))] == acked


def test_redis_outage_loses_no_acked_message_and_reuses_no_seq(nodes, chat, redis_server):
    (node,) = nodes(1)
    reader = chat(node.port, "reader", room="r")
    sender = chat(node.port, "sender", room="r")
    acked: list[int] = []
    refused = 0
    stop = gevent.event.Event()

    def send_forever():
        nonlocal refused
        n = 0
        while not stop.is_set():
            try:
                acked.append(sender.send("r", f"n{n}", id=f"id{n}")["seq"])
                n += 1
            except ChatError as exc:
                assert exc.code == "unavailable"
                refused += 1
                gevent.sleep(0.05)  # a client's retry pause
    worker = gevent.spawn(send_forever)
    until(lambda: len(acked) >= 20, what="traffic before the outage")
    redis_server.stop()
    until(lambda: node.admin("/ready")[0] == 503, what="/ready 503")
    assert node.admin("/ready")[1]["reason"] == "broker"
    until(lambda: refused > 0, what="an unavailable error")
    redis_server.start()
    until(lambda: node.admin("/ready")[0] == 200, timeout=15, what="/ready 200 again")
    before = len(acked)
    until(lambda: len(acked) >= before + 20, what="traffic after the outage")
    stop.set()
    worker.join(timeout=10)
    assert len(acked) == len(set(acked)) and acked == sorted(acked), "a seq was reused"
    got = []
    while not got or got[-1] < acked[-1]:
        got.append(reader.expect("msg", room="r", timeout=10)["seq"])
    assert got == sorted(set(got)), "a message came twice or out of order"
    assert set(acked) <= set(got), "an acked message was lost"


def test_workers_share_one_port_and_chat_across(start_server, redis_server, chat):
    s = start_server(broker=redis_server.url, workers=2, rate=100000, burst=100000)
    clients = [chat(s.port, f"w{i}", room="r") for i in range(24)]
    stats = s.stats()
    per_worker = [w["connections"] for w in stats["workers"]]
    assert stats["connections"] == 24 and all(n > 0 for n in per_worker), per_worker
    clients[0].send("r", "to everyone")
    for c in clients:
        assert c.expect("msg", room="r")["text"] == "to everyone"
    assert 'worker="1"' in s.admin("/metrics")[1]
    s.signal()
    assert s.wait() == 0


def test_a_dead_worker_is_restarted(start_server, redis_server, chat):
    s = start_server(broker=redis_server.url, workers=2)
    first = s.stats()["workers"][0]
    os.kill(first["pid"], signal.SIGKILL)
    s.wait_for_log(r"worker 0 exited")
    s.wait_for_log(rf"worker 0 ready \(pid (?!{first['pid']}\))\d+", timeout=15)
    assert s.stats()["workers"][0]["pid"] != first["pid"]
    assert chat(s.port, "after-restart").nick == "after-restart"


def test_since_beyond_64_bits_means_nothing_newer(nodes, chat):
    (node,) = nodes(1)
    c = chat(node.port, "big-since", room="r")
    c.send("r", "one")
    for since in (2**63 - 1, 2**64, 10**30):
        assert c.history("r", since=since) == []
        assert c.join("r", since=since)["seq"] == 1
    assert [m["seq"] for m in c.history("r", limit=10**19)] == [1]
