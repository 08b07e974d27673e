"""Parked connections: a connection with nothing to read holds no greenlet (conn.py).

Each behaviour that used to rely on a greenlet blocked in ``recv`` is checked on parked
connections here: deliveries, waking on input, the ticker's timeouts, takeover, the drain.
A connection parks before its reply is flushed (the reader ends, then the turn's writes
run), so once a client has read its reply the server's /stats already shows it parked.
"""
from __future__ import annotations

import ssl

from gochat.client import Client

N = 60


def joined(chat, port: int, n: int, room: str) -> list[Client]:
    return [chat(port, f"p{k}", room) for k in range(n)]


def test_idle_connections_are_parked_and_still_get_everything(start_server, chat):
    s = start_server(rate=1000, burst=1000)
    baseline = s.stats()["greenlets"]
    assert baseline >= 3  # main, hub, ticker: those frozen at start-up (gc.freeze) are counted too
    clients = joined(chat, s.port, N, "lounge")
    stats = s.stats()
    assert stats["connections"] == stats["parked_connections"] == N
    assert stats["handler_greenlets"] == 0
    assert stats["greenlets"] <= baseline + 2  # the admin request's own greenlets at most
    # deliveries to parked connections need no greenlet of theirs
    clients[0].send_nowait({"type": "msg", "room": "lounge", "text": "to everyone", "id": 1})
    for c in clients:
        assert c.expect("msg", room="lounge")["text"] == "to everyone"
    # input wakes each one: a reader greenlet starts, answers and ends again
    for k, c in enumerate(clients):
        c.send_nowait({"type": "ping", "id": f"w{k}"})
    for k, c in enumerate(clients):
        assert c.expect("pong")["id"] == f"w{k}"
    stats = s.stats()
    assert stats["parked_connections"] == N and stats["handler_greenlets"] == 0


def test_a_parked_connection_is_pinged_and_timed_out(start_server, raw):
    s = start_server(heartbeat=0.3, idle_timeout=0.9)
    c = raw(s.port)
    c.send({"type": "hello", "nick": "sleeper"})
    c.expect("welcome")
    assert s.stats()["parked_connections"] == 1
    c.expect("ping", timeout=3)
    assert c.expect("error", timeout=3)["code"] == "idle_timeout"
    assert c.closed()
    s.wait_for_log("nick=sleeper reason=idle_timeout")
    assert s.stats()["connections"] == 0


def test_a_parked_connection_is_taken_over(start_server, chat):
    s = start_server()
    old = chat(s.port, "mover", "hall")
    assert s.stats()["parked_connections"] == 1
    new = chat(s.port)
    assert new.hello(resume=old.session)["nick"] == "mover"
    assert old.recv(timeout=5) is None
    s.wait_for_log("reason=takeover")


def test_the_drain_ends_parked_connections(start_server, chat):
    s = start_server(drain_spread=0, drain_timeout=5)
    clients = joined(chat, s.port, 10, "hall")
    assert s.stats()["parked_connections"] == 10
    s.signal()
    for c in clients:
        assert c.expect("shutdown")["type"] == "shutdown"
    assert s.wait() == 0
    assert sum("reason=shutdown" in line for line in s.lines) == 10


def test_tls_connections_do_not_park(start_server, certificate):
    cert, key = certificate
    s = start_server(tls_cert=cert, tls_key=key)
    context = ssl.create_default_context(cafile=cert)
    clients = [Client("127.0.0.1", s.port, tls=context) for _ in range(3)]
    try:
        for k, c in enumerate(clients):
            c.hello(nick=f"t{k}")
        stats = s.stats()
        assert stats["parked_connections"] == 0 and stats["handler_greenlets"] == 3
    finally:
        for c in clients:
            c.close()
