"""Every configurable limit of PROTOCOL.md sections 4 and 6, each against its own server."""
from __future__ import annotations

import socket
import time
import struct
import zlib

import pytest

from gochat.client import ChatError, Client


def test_max_frame_bytes_for_lines_and_frames(start_server, raw):
    s = start_server(max_frame_bytes=1024)
    line = raw(s.port)
    line.send({"type": "hello", "nick": "fits", "pad": "x" * 900})
    line.expect("welcome")
    line.send_raw(b'{"type":"ping","pad":"' + b"x" * 1100)  # no newline yet: rejected all the same
    line.expect("error", code="too_large")
    assert line.closed()
    framed = raw(s.port, "frames")
    framed.send_raw(struct.pack(">II", 1025, 0))  # the header alone is enough to refuse
    framed.expect("error", code="too_large")
    assert framed.closed()


def test_max_text_chars(start_server, chat):
    s = start_server(max_text_chars=10)
    a = chat(s.port, "short", room="r")
    assert a.send("r", "é" * 10)["seq"] == 1  # code points, not bytes
    with pytest.raises(ChatError) as err:
        a.send("r", "x" * 11)
    assert err.value.code == "bad_request" and "text" in err.value.message
    with pytest.raises(ChatError):
        a.dm("short", "y" * 11)


def test_handshake_timeout(start_server, raw, chat):
    s = start_server(handshake_timeout=0.5)
    silent = raw(s.port)
    assert silent.closed(timeout=5) and silent.buf == b""  # no codec yet: closed without a word
    partial = raw(s.port)
    partial.send_raw(b'{"type":"hel')
    partial.expect("error", code="handshake_timeout")
    assert partial.closed()
    greeted = chat(s.port, "in-time")
    server_side = s.wait_for_log(r"reason=handshake_timeout")  # both timeouts have fired by now
    assert server_side
    assert greeted.ping()["type"] == "pong"


def test_heartbeat_pings_and_idle_timeout(start_server, raw, chat):
    s = start_server(heartbeat=0.2, idle_timeout=0.8)
    answering = chat(s.port, "answers")  # the client library answers pings itself
    mute = raw(s.port)
    mute.send({"type": "hello", "nick": "mute"})
    welcome = mute.expect("welcome")
    assert welcome["heartbeat"] == 0.2
    first = mute.expect("ping")
    assert isinstance(first["ts"], int)
    mute.expect("ping")
    mute.expect("error", code="idle_timeout", timeout=3)
    assert mute.closed()
    assert answering.ping()["type"] == "pong"  # alive well past idle_timeout
    status, metrics = s.admin("/metrics")
    assert "gochat_heartbeat_rtt_seconds_count 0.0" not in metrics


def test_text_mode_gets_no_pings_and_no_idle_timeout(start_server, raw):
    s = start_server(heartbeat=0.1, idle_timeout=0.3)
    t = raw(s.port, "text")
    t.send_raw(b"typist\n")
    t.expect_line("* joined lobby")
    with pytest.raises(socket.timeout):
        t.read(timeout=1.0)  # three idle timeouts long: nothing comes, nothing closes
    t.send_raw(b"/rooms\n")
    t.expect_line("* rooms: lobby(1)")


def test_heartbeat_zero_and_idle_zero_turn_them_off(start_server, raw):
    s = start_server(heartbeat=0, idle_timeout=0)
    c = raw(s.port)
    c.send({"type": "hello", "nick": "quiet"})
    assert c.expect("welcome")["heartbeat"] == 0
    with pytest.raises(socket.timeout):
        c.read(timeout=0.5)


def test_rate_limit_burst_and_strikes(start_server, raw):
    s = start_server(rate=0.5, burst=3, max_strikes=4)
    c = raw(s.port)
    c.send({"type": "hello", "nick": "flood", "id": 0})  # takes a token too
    c.expect("welcome")
    c.send({"type": "join", "room": "r", "id": "j"})
    c.expect("joined")
    c.send({"type": "pong", "ts": 1})  # exempt
    for k in range(10):
        c.send({"type": "msg", "room": "r", "text": "x", "id": k})
    replies = []
    while True:
        try:
            replies.append(c.read())
        except ConnectionError:
            break
    acks = [m["id"] for m in replies if m["type"] == "ack"]
    limited = [m["id"] for m in replies if m.get("code") == "rate_limited"]
    assert acks == [0]  # hello, join and one msg used the burst of 3
    assert limited == [1, 2, 3, 4]  # the fourth strike in a row closes
    assert "closed after 4" in [m for m in replies if m.get("code") == "rate_limited"][-1]["message"]


def test_accepted_request_resets_strikes(start_server, raw):
    """Two strikes would close; a request accepted between them resets the count."""
    s = start_server(rate=4, burst=1, max_strikes=2)
    c = raw(s.port)
    c.send({"type": "hello", "nick": "pacer"})
    c.expect("welcome")
    for round_ in range(2):
        c.send({"type": "ping", "ts": round_, "id": "fast"})
        assert c.read() == {"type": "error", "code": "rate_limited", "id": "fast",
                            "message": "too many requests, slow down"}
        time.sleep(0.3)  # the bucket refills in 0.25 s: time passing is what is tested here
        c.send({"type": "ping", "ts": round_})
        assert c.read() == {"type": "pong", "ts": round_}


def test_slow_consumer_is_dropped_and_others_get_everything(start_server, chat):
    s = start_server(max_outbound_bytes=16384, rate=100000, burst=100000)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", s.port))
    stuck.sendall(b'{"type":"hello","nick":"stuck"}\n{"type":"join","room":"flood"}\n')
    reader = chat(s.port, "reader", room="flood")
    sender = chat(s.port, "sender", room="flood")
    text = "y" * 4000
    total = 1500  # 6 MB: more than the kernel's socket buffers (4 MB here) can hide
    for k in range(total):
        sender.send("flood", text)  # acked one by one: the sender itself keeps up
    seqs = [reader.expect("msg", room="flood")["seq"] for _ in range(total)]
    assert seqs == list(range(1, total + 1))
    s.wait_for_log(r"nick=stuck reason=slow_consumer")
    assert "gochat_errors_sent_total{code=\"slow_consumer\"} 1.0" in s.admin("/metrics")[1]
    stuck.close()


def test_history_size(start_server, chat):
    s = start_server(history_size=3)
    a = chat(s.port, "keeper", room="r")
    for k in range(5):
        a.send("r", f"m{k}")
    assert [m["text"] for m in a.history("r")] == ["m2", "m3", "m4"]
    assert [m["text"] for m in a.history("r", limit=500)] == ["m2", "m3", "m4"]  # capped at history_size
    late = chat(s.port, "late")
    joined = late.join("r", since=0)
    assert (joined["seq"], joined["first_seq"]) == (5, 3)  # since < first_seq - 1: two were lost
    assert [late.expect("msg")["seq"] for _ in range(3)] == [3, 4, 5]


def test_history_size_zero_keeps_nothing(start_server, chat):
    s = start_server(history_size=0)
    a = chat(s.port, "forget", room="r")
    a.send("r", "gone")
    assert a.history("r") == []
    assert a.join("r")["first_seq"] == 2


def test_resume_window_expiry_sends_offline_and_frees_the_nick(start_server, chat):
    s = start_server(resume_window=0.5)
    watcher = chat(s.port, "watcher", room="r")
    leaver = chat(s.port, "leaver", room="r")
    session = leaver.session
    leaver.close()
    assert watcher.who("r") == ["watcher", "leaver"]  # still a member while resumable
    watcher.expect("presence", room="r", nick="leaver", status="offline", timeout=5)
    late = chat(s.port)
    with pytest.raises(ChatError) as err:
        late.hello(resume=session)
    assert err.value.code == "bad_session"
    assert late.hello(nick="leaver")["nick"] == "leaver"


def test_resume_window_zero_is_offline_at_once(start_server, chat):
    s = start_server(resume_window=0)
    watcher = chat(s.port, "w0", room="r")
    gone = chat(s.port, "g0", room="r")
    gone.close()
    watcher.expect("presence", room="r", nick="g0", status="offline")


def test_max_connections_answers_in_the_clients_codec(start_server, raw, chat):
    s = start_server(max_connections=2)
    keep = [chat(s.port, f"k{i}") for i in range(2)]
    assert s.admin("/ready") == (503, {"ready": False, "reason": "full"})
    for codec in ("frames", "json", "text"):
        extra = raw(s.port, codec)
        if codec == "frames":
            extra.send({"type": "hello", "nick": "extra"})
            assert extra.read()["code"] == "too_many_connections"
        elif codec == "json":
            extra.send({"type": "hello", "nick": "extra"})
            assert extra.read()["code"] == "too_many_connections"
        else:
            extra.send_raw(b"extra\n")
            assert extra.read().startswith("! too_many_connections")
        assert extra.closed()
    assert keep[0].ping()["type"] == "pong"
    keep[0].bye()
    s.wait_for_log(r"nick=k0 reason=bye")
    assert chat(s.port, "later").nick == "later"


def test_max_conns_per_ip(start_server, raw):
    s = start_server(max_conns_per_ip=2)
    local = [Client("127.0.0.1", s.port) for _ in range(2)]
    for c in local:
        c.hello(nick=f"ip{id(c)}"[:30])
    extra = raw(s.port)
    extra.send({"type": "hello", "nick": "third"})
    extra.expect("error", code="too_many_connections")
    other_ip = Client("127.0.0.1", s.port, source="127.0.0.2")
    assert other_ip.hello(nick="elsewhere")["nick"] == "elsewhere"
    for c in local + [other_ip]:
        c.close()


def test_bad_input_keeps_the_connection_and_counts_errors(start_server, raw):
    s = start_server()
    c = raw(s.port)
    c.send({"type": "hello", "nick": "garbage"})
    c.expect("welcome")
    for data, code in ((b"{nope\n", "bad_json"), (b"\xff\xfe{\n", "bad_json"), (b"[1]\n", "bad_json"),
                       (b'{"type":7}\n', "bad_request"), (b'{"type":"warp"}\n', "unknown_type"),
                       (b'{"type":"join","room":5}\n', "bad_request"), (b'{"type":"ping","id":1.5}\n', "bad_request"),
                       (b'{"type":"hello","nick":"again"}\n', "bad_request")):
        c.send_raw(data)
        assert c.expect("error")["code"] == code, data
    framed = raw(s.port, "frames")
    payload = b'{"type":"hello","nick":"crc"}'
    framed.send_raw(struct.pack(">II", len(payload), zlib.crc32(payload) ^ 1) + payload)
    framed.expect("error", code="bad_checksum")
    framed.send({"type": "hello", "nick": "crc"})
    framed.expect("welcome")
    assert 'gochat_errors_sent_total{code="bad_json"} 3.0' in s.admin("/metrics")[1]


def test_shutting_down_requests_are_refused_during_the_drain(start_server, chat):
    s = start_server(drain_timeout=2, rate=100000, burst=100000)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", s.port))
    stuck.sendall(b'{"type":"hello","nick":"stuck"}\n{"type":"join","room":"big"}\n')
    talker = chat(s.port, "talker", room="big")
    for _ in range(40):
        talker.send_nowait({"type": "msg", "room": "big", "text": "z" * 4000})
    talker.expect("msg", room="big")
    s.signal()
    talker.expect("shutdown")
    with pytest.raises(ChatError) as err:
        talker.send("big", "too late")
    assert err.value.code == "shutting_down"
    assert s.admin("/ready") == (503, {"ready": False, "reason": "draining"})
    assert s.wait() == 0
    stuck.close()


def test_gevent_pool_is_not_the_cap(start_server, raw):
    """Rejected clients are answered even when max_connections is tiny (no backlog hang)."""
    s = start_server(max_connections=1)
    first = raw(s.port)
    first.send({"type": "hello", "nick": "one"})
    first.expect("welcome")
    rejected = [raw(s.port) for _ in range(20)]
    for r in rejected:
        r.send({"type": "ping"})
    for r in rejected:
        assert r.expect("error")["code"] == "too_many_connections"


def test_max_rooms_forgets_the_least_recently_used_empty_room(start_server, chat):
    s = start_server(max_rooms=3)
    a = chat(s.port, "roomer")
    for room in ("r1", "r2", "r3"):
        a.join(room)
        a.send(room, f"in {room}")
        a.leave(room)
    a.join("r1")  # r1 has a member again: never evicted while it has one
    a.join("r4")
    a.send("r4", "in r4")  # a fourth room: r2, the least recently used empty one, goes
    assert a.history("r2") == []
    assert [m["text"] for m in a.history("r1")] == ["in r1"]
    assert [m["text"] for m in a.history("r3")] == ["in r3"]
    assert a.join("r2")["seq"] == 0  # a new room again, which makes r3 the one to go
    assert a.history("r3") == []


def test_client_sockets_get_nodelay_and_keepalive_from_the_listener():
    """Set once on the listener (server.py): the kernel must copy both to accepted sockets."""
    from gochat.server import listening_socket, set_accepted_socket_options

    listener = listening_socket("127.0.0.1", 0)
    set_accepted_socket_options(listener)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        for s in (accepted, client, listener):
            s.close()
