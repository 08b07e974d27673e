"""Sessions across connections, and the server's graceful drain (PROTOCOL.md sections 5 and 6)."""
from __future__ import annotations

import signal
import socket
import time

import gevent
import pytest

from gochat.client import ChatError


def test_resume_replays_exactly_what_was_missed(start_server, chat):
    s = start_server()
    peer = chat(s.port, "peer", room="r")
    b = chat(s.port, "resumer", room="r")
    peer.send("r", "seen")
    seen = b.expect("msg", room="r")["seq"]
    session = b.session
    b.close()
    s.wait_for_log(r"nick=resumer reason=peer_closed")
    missed = [peer.send("r", f"missed{k}")["seq"] for k in range(3)]
    b2 = chat(s.port)
    welcome = b2.hello(resume=session)
    assert (welcome["nick"], welcome["session"]) == ("resumer", session)
    live = peer.send("r", "after resume")["seq"]  # reaches b2 live, before its join
    assert b2.expect("msg", room="r")["seq"] == live
    b2.join("r", since=seen)
    replay = [b2.expect("msg", room="r")["seq"] for _ in range(3)]
    assert replay == missed
    peer.send("r", "marker")
    assert b2.expect("msg", room="r")["text"] == "marker"  # "after resume" was not replayed again
    presence = [m for m in list(peer.inbox.queue) if m["type"] == "presence"]
    assert presence == [{"type": "presence", "room": "r", "nick": "resumer", "status": "join"}]  # resume is silent


def test_resume_takes_over_a_live_connection(start_server, chat, raw):
    s = start_server()
    old = chat(s.port, "twice", room="r")
    new = chat(s.port)
    assert new.hello(resume=old.session)["nick"] == "twice"
    assert old.recv(timeout=5) is None  # the old connection is closed
    peer = chat(s.port, "other", room="r")
    peer.send("r", "to the new one")
    assert new.expect("msg", room="r")["text"] == "to the new one"
    assert new.who("r") == ["twice", "other"]


def test_resumed_session_remembers_acked_ids(start_server, chat):
    s = start_server()
    a = chat(s.port, "remember", room="r")
    first = a.send("r", "once", id="keep-1")
    a.close()
    again = chat(s.port)
    again.hello(resume=a.session)
    assert again.send("r", "once", id="keep-1") == {**first, "dup": True}


def test_text_sessions_cannot_be_resumed(start_server, raw, chat):
    s = start_server()
    t = raw(s.port, "text")
    t.send_raw(b"typist\n")
    t.expect_line("* joined lobby")
    assert chat(s.port, "typist-2").nick == "typist-2"
    t.close()
    s.wait_for_log(r"nick=typist reason=peer_closed")
    assert chat(s.port, "typist").nick == "typist"  # freed at once


def test_graceful_shutdown_tells_every_codec_and_exits_zero(start_server, chat, raw):
    s = start_server(drain_timeout=3)
    json_user = chat(s.port, "j", room="r")
    frames_user = chat(s.port, "f", room="r", codec="frames")
    text_user = raw(s.port, "text")
    text_user.send_raw(b"t\n")
    text_user.expect_line("* joined lobby")
    half = raw(s.port)  # still in the handshake: closed silently
    s.signal(signal.SIGTERM)
    for client in (json_user, frames_user):
        shutdown = client.expect("shutdown")
        assert shutdown["reason"] and 1000 <= shutdown["reconnect_after"] <= 5000
        assert client.recv(timeout=5) is None
    assert text_user.expect_line("* server shutting down, reconnect in").endswith(" s")
    assert text_user.closed()
    assert half.closed() and half.buf == b""
    assert s.wait() == 0
    assert any("drained" in line for line in s.lines)


def test_drain_flushes_queued_output_before_closing(start_server, chat):
    s = start_server(drain_timeout=5, rate=100000, burst=100000)
    reader = chat(s.port, "reader", room="r")
    writer = chat(s.port, "writer", room="r")
    sent = [writer.send("r", f"m{k}")["seq"] for k in range(200)]
    s.signal()
    got = []
    while (m := reader.recv(timeout=5)) is not None:
        if m["type"] == "msg":
            got.append(m["seq"])
    assert got == sent


def test_second_signal_exits_at_once_with_status_1(start_server, chat):
    s = start_server(drain_timeout=60, rate=100000, burst=100000, max_outbound_bytes=64 * 2**20)
    stuck = socket.socket()  # a client that never reads keeps the drain waiting
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", s.port))
    stuck.sendall(b'{"type":"hello","nick":"stuck"}\n{"type":"join","room":"r"}\n')
    talker = chat(s.port, "talker", room="r")
    for _ in range(1200):  # 4.8 MB: more than the kernel's buffers hold for the stuck client
        talker.send("r", "w" * 4000)
    s.signal(signal.SIGTERM)
    talker.expect("shutdown")
    assert s.admin("/ready")[0] == 503
    s.signal(signal.SIGINT)
    assert s.wait() == 1
    stuck.close()


def test_bye_flushes_and_frees_the_nick(start_server, chat):
    s = start_server()
    a = chat(s.port, "leaving", room="r")
    b = chat(s.port, "staying", room="r")
    a.bye()
    b.expect("presence", room="r", nick="leaving", status="offline")
    assert chat(s.port, "leaving").nick == "leaving"


def test_second_hello_is_bad_request(start_server, chat):
    s = start_server()
    a = chat(s.port, "first")
    with pytest.raises(ChatError) as err:
        a.hello(nick="second")
    assert err.value.code == "bad_request"


def test_handler_exception_closes_only_that_connection(start_server, chat, raw):
    s = start_server(test_faults=1)
    watcher = chat(s.port, "watcher", room="r")
    victim = raw(s.port)
    victim.send({"type": "hello", "nick": "victim"})
    victim.expect("welcome")
    victim.send({"type": "join", "room": "r"})
    victim.expect("joined")
    victim.send({"type": "test_fault"})
    assert victim.closed()
    s.wait_for_log(r"Traceback")
    s.wait_for_log(r"RuntimeError: fault injected by test_fault")
    assert watcher.send("r", "still here")["seq"] == 1
    assert "gochat_handler_exceptions_total 1.0" in s.admin("/metrics")[1]
    assert 'gochat_connections_closed_total{reason="handler_exception"} 1.0' in s.admin("/metrics")[1]


def test_lame_duck_drain_spreads_the_closes(start_server, chat):
    s = start_server(drain_timeout=10, drain_spread=2)
    clients = [chat(s.port, f"duck{i}") for i in range(8)]
    s.signal()
    offsets = sorted(c.expect("shutdown")["reconnect_after"] for c in clients)
    assert offsets[0] >= 1000 and offsets[-1] - offsets[0] > 1000  # spread: some close seconds later
    def closed_when(client):
        assert client.recv(timeout=10) is None
        return time.monotonic()

    watchers = [gevent.spawn(closed_when, c) for c in clients]
    closed_at = [w.get(timeout=15) for w in watchers]
    assert max(closed_at) - min(closed_at) > 1.0  # not one storm
    assert s.wait() == 0
