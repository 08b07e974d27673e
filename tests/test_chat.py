"""Chat semantics over real sockets against one shared `gochat serve` process."""
from __future__ import annotations

import gevent
import pytest

from gochat.client import ChatError


def test_fanout_order_with_several_senders(server, chat):
    senders = [chat(server.port, f"snd{i}", room="order") for i in range(3)]
    readers = [chat(server.port, f"rdr{i}", room="order") for i in range(4)]
    per_sender = 100

    def blast(client, k):
        for n in range(per_sender):
            client.send_nowait({"type": "msg", "room": "order", "text": f"{k}:{n}", "id": n})

    gevent.joinall([gevent.spawn(blast, c, k) for k, c in enumerate(senders)], raise_error=True)
    total = per_sender * len(senders)
    for client in senders + readers:
        got = [client.expect("msg", room="order") for _ in range(total)]
        seqs = [m["seq"] for m in got]
        assert seqs == list(range(seqs[0], seqs[0] + total)), "gaps or disorder"
        for k in range(len(senders)):  # each sender's own messages keep their order too
            mine = [m["text"] for m in got if m["from"] == f"snd{k}"]
            assert mine == [f"{k}:{n}" for n in range(per_sender)]


def test_ack_carries_seq_and_msg_carries_id(server, chat):
    a = chat(server.port, "acker", room="acks")
    ack = a.send("acks", "hello", id="c1")
    assert ack["id"] == "c1" and ack["room"] == "acks" and ack["seq"] == 1 and isinstance(ack["ts"], int)
    msg = a.expect("msg", room="acks")
    assert (msg["from"], msg["text"], msg["seq"], msg["id"], msg["ts"]) == ("acker", "hello", 1, "c1", ack["ts"])


def test_presence_join_leave_offline(server, chat):
    a = chat(server.port, "pres-a", room="pres")
    b = chat(server.port, "pres-b", room="pres")
    assert a.expect("presence", room="pres")["nick"] == "pres-b"
    b.leave("pres")
    assert a.expect("presence", room="pres", nick="pres-b")["status"] == "leave"
    b.join("pres")
    a.expect("presence", room="pres", nick="pres-b", status="join")
    b.bye()
    a.expect("presence", room="pres", nick="pres-b", status="offline")
    assert a.who("pres") == ["pres-a"]


def test_rejoin_is_not_an_error_and_sends_no_presence(server, chat):
    a = chat(server.port, "rejoin-a", room="rejoin")
    b = chat(server.port, "rejoin-b", room="rejoin")
    a.expect("presence", nick="rejoin-b")
    again = b.join("rejoin")
    assert again["members"] == ["rejoin-a", "rejoin-b"]
    b.send("rejoin", "marker")
    assert a.expect("msg", room="rejoin")["text"] == "marker"  # no presence came before it
    assert a.inbox.empty()


def test_direct_messages(server, chat):
    a = chat(server.port, "dm-Alice")
    b = chat(server.port, "dm-bob")
    ack = a.dm("DM-BOB", "psst", id="d1")
    assert ack["id"] == "d1" and isinstance(ack["ts"], int) and "seq" not in ack
    got = b.expect("dm")
    assert (got["from"], got["text"], got["ts"]) == ("dm-Alice", "psst", ack["ts"])
    assert "id" not in got
    with pytest.raises(ChatError) as err:
        a.dm("nobody-here", "x")
    assert err.value.code == "no_such_user"


def test_dm_to_a_session_awaiting_resume_is_no_such_user(server, chat):
    a = chat(server.port, "dm-live")
    gone = chat(server.port, "dm-gone")
    gone.close()
    server.wait_for_log(r"nick=dm-gone reason=peer_closed")
    with pytest.raises(ChatError) as err:
        a.dm("dm-gone", "are you there")
    assert err.value.code == "no_such_user"


def test_who_rooms_history(server, chat):
    a = chat(server.port, "hist-a", room="hist")
    acks = [a.send("hist", f"t{k}") for k in range(5)]
    assert a.who("hist") == ["hist-a"]
    rooms = {r["room"]: r for r in a.rooms()}
    assert rooms["hist"] == {"room": "hist", "members": 1, "seq": acks[-1]["seq"], "epoch": rooms["hist"]["epoch"]}
    assert isinstance(rooms["hist"]["epoch"], str) and rooms["hist"]["epoch"]
    assert [m["text"] for m in a.history("hist", since=2, limit=2)] == ["t2", "t3"]
    assert [m["seq"] for m in a.history("hist")] == [1, 2, 3, 4, 5]
    outsider = chat(server.port, "hist-out")
    assert [m["text"] for m in outsider.history("hist", since=4)] == ["t4"]  # works without joining
    assert outsider.who("never-used") == [] and outsider.history("never-used") == []


def test_rooms_lists_only_rooms_with_members(server, chat):
    a = chat(server.port, "roomlist", room="short-lived")
    a.send("short-lived", "x")
    a.leave("short-lived")
    assert "short-lived" not in {r["room"] for r in a.rooms()}


def test_join_since_replays_and_first_seq(server, chat):
    a = chat(server.port, "since-a", room="since")
    for k in range(4):
        a.send("since", f"s{k}")
    late = chat(server.port, "since-late")
    joined = late.join("since", since=2)
    assert (joined["seq"], joined["first_seq"]) == (4, 1)
    replay = [late.expect("msg", room="since") for _ in range(2)]
    assert [(m["seq"], m["text"], m["from"]) for m in replay] == [(3, "s2", "since-a"), (4, "s3", "since-a")]


def test_not_in_room_and_bad_room(server, chat):
    a = chat(server.port, "strict")
    for call, code in ((lambda: a.send("elsewhere", "x"), "not_in_room"),
                       (lambda: a.leave("elsewhere"), "not_in_room"),
                       (lambda: a.join("no spaces"), "bad_room"),
                       (lambda: a.join("x" * 65), "bad_room")):
        with pytest.raises(ChatError) as err:
            call()
        assert err.value.code == code


def test_nick_unique_case_insensitively_and_freed_by_bye(server, chat):
    a = chat(server.port, "Unique")
    other = chat(server.port)
    with pytest.raises(ChatError) as err:
        other.hello(nick="uNIQUE")
    assert err.value.code == "nick_taken"
    a.bye()
    assert other.hello(nick="unique")["nick"] == "unique"


def test_duplicate_id_is_acked_again_not_delivered(server, chat):
    a = chat(server.port, "dup-a", room="dup")
    b = chat(server.port, "dup-b", room="dup")
    first = a.send("dup", "once", id=77)
    again = a.send("dup", "once", id=77)
    assert again == {**first, "dup": True}
    dm_first = a.dm("dup-b", "hi", id="dm-77")
    assert a.dm("dup-b", "hi", id="dm-77") == {**dm_first, "dup": True}
    b.expect("msg", room="dup")
    b.expect("dm")
    a.send("dup", "marker")
    assert b.expect("msg", room="dup")["text"] == "marker"  # nothing between: not delivered twice
    assert b.inbox.empty()


def test_frames_and_json_and_text_share_a_room(server, chat, raw):
    framed = chat(server.port, "fr-user", room="mixed", codec="frames")
    plain = chat(server.port, "js-user", room="mixed")
    text = raw(server.port, "text")
    text.send_raw(b"txt-user\n")
    assert text.read() == "* welcome txt-user"
    text.send_raw(b"/join mixed\n")
    text.expect_line("* joined mixed")
    framed.send("mixed", "from frames")
    assert plain.expect("msg", room="mixed", **{"from": "fr-user"})["text"] == "from frames"
    text.expect_line("[mixed] fr-user: from frames")
    text.send_raw(b"from text\n")
    assert framed.expect("msg", room="mixed", **{"from": "txt-user"})["text"] == "from text"
    text.expect_line("[mixed] txt-user: from text")  # the sender sees its own line


def test_text_mode_commands(server, raw, chat):
    json_user = chat(server.port, "tm-json", room="lobby")
    t = raw(server.port, "text")
    t.send_raw(b"bad nick!\n")
    assert t.read().startswith("! bad_nick")
    t.send_raw(b"tm-json\n")
    assert t.read().startswith("! nick_taken")
    t.send_raw(b"tm-text\n")
    assert t.read() == "* welcome tm-text"
    t.expect_line("* joined lobby")
    json_user.expect("presence", room="lobby", nick="tm-text", status="join")
    t.send_raw(b"/who\n")
    line = t.expect_line("* members of lobby:")
    assert "tm-json" in line and "tm-text" in line
    t.send_raw(b"/rooms\n")
    assert "lobby(" in t.expect_line("* rooms:")
    t.send_raw(b"/msg tm-json psst\n")
    assert json_user.expect("dm")["text"] == "psst"
    json_user.dm("tm-text", "back")
    t.expect_line("[dm] tm-json: back")
    t.send_raw(b"/frobnicate\n")
    t.expect_line("! bad_request: unknown command /frobnicate")
    t.send_raw(b"/leave lobby\n")
    t.expect_line("* left lobby")
    json_user.expect("presence", room="lobby", nick="tm-text", status="leave")
    t.send_raw(b"anyone?\n")
    t.expect_line("! not_in_room")
    t.send_raw(b"/join lobby\n")
    t.expect_line("* joined lobby")
    t.send_raw(b"/quit\n")
    assert t.closed()
    json_user.expect("presence", room="lobby", nick="tm-text", status="offline")


def test_text_session_goes_offline_at_once(server, raw, chat):
    watcher = chat(server.port, "tm-watch", room="lobby")
    t = raw(server.port, "text")
    t.send_raw(b"tm-drop\n")
    t.expect_line("* joined lobby")
    t.close()
    watcher.expect("presence", room="lobby", nick="tm-drop", status="offline")


def test_ping_pong_echoes_ts(server, chat):
    a = chat(server.port, "pinger")
    assert a.ping(ts=123)["ts"] == 123
    assert a.ping(ts="abc")["ts"] == "abc"


def test_admin_endpoints(server):
    assert server.admin("/health")[0] == 200
    assert server.admin("/ready") == (200, {"ready": True})
    status, stats = server.admin("/stats")
    assert status == 200
    for key in ("connections", "sessions", "rooms", "greenlets", "messages_in", "deliveries", "uptime_s"):
        assert key in stats
    status, text = server.admin("/metrics")
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert status == 200 and samples and all(line.startswith("gochat_") for line in samples)
    assert server.admin("/nope")[0] == 404
