"""The client library's own resilience: backoff, error classes, and a rolling restart."""
from __future__ import annotations

import gevent
import pytest

from gochat.client import Backoff, ChatError, FatalChatError, ReconnectingClient


def test_backoff_is_jittered_exponential_and_capped():
    backoff = Backoff(base=0.1, cap=1.0)
    pauses = [backoff.pause() for _ in range(12)]
    assert all(0 <= p <= min(1.0, 0.1 * 2 ** i) for i, p in enumerate(pauses))
    assert len(set(pauses)) > 1  # jittered
    backoff.reset()
    assert backoff.pause() <= 0.1


def test_fatal_errors_raise_with_the_cause_chained(start_server, chat):
    s = start_server()
    chat(s.port, "taken")
    with pytest.raises(FatalChatError) as err:
        ReconnectingClient([("127.0.0.1", s.port)], nick="taken")
    assert err.value.code == "nick_taken" and isinstance(err.value.__cause__, ChatError)
    with pytest.raises(FatalChatError) as err:
        ReconnectingClient([("127.0.0.1", s.port)], nick="bad nick!")
    assert err.value.code == "bad_nick"


def test_rate_limited_is_retried_after_a_pause(start_server):
    s = start_server(rate=20, burst=2, max_strikes=1000)
    client = ReconnectingClient([("127.0.0.1", s.port)], nick="patient")
    client.join("r")
    seqs = [client.send("r", f"m{k}")["seq"] for k in range(6)]  # over the burst: paused and retried
    assert seqs == list(range(1, 7))
    client.close()


def test_rolling_restart_of_two_nodes_loses_no_acked_message(start_server, redis_server):
    """Restart node A, then node B, while a sender posts and readers on both nodes read."""
    settings = dict(broker=redis_server.url, presence_ttl=2, drain_timeout=3, rate=100000, burst=100000)
    a, b = start_server(**settings), start_server(**settings)
    addresses = [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
    readers = [ReconnectingClient(addresses[i % 2:] + addresses[:i % 2], nick=f"reader{i}") for i in range(4)]
    for reader in readers:
        reader.join("r")
    sender = ReconnectingClient(addresses, nick="sender")
    sender.join("r")
    acked: list[int] = []
    stop = gevent.event.Event()

    def send_until_stopped():
        k = 0
        while not stop.is_set():
            acked.append(sender.send("r", f"m{k}")["seq"])
            k += 1
            gevent.sleep(0.01)
        acked.append(sender.send("r", "end")["seq"])  # tells the readers there is no more

    def read_all(reader):
        seen = []
        while True:
            message = reader.recv(timeout=30)
            if message["type"] == "msg":
                seen.append(message["seq"])
                if message["text"] == "end":
                    return seen

    sending = gevent.spawn(send_until_stopped)
    reading = [gevent.spawn(read_all, r) for r in readers]
    for old in (a, b):
        before = len(acked)
        old.signal()
        assert old.wait() == 0
        start_server(args=["--port", str(old.port)], **settings)  # the new version, same address
        deadline = gevent.Timeout(30)
        with deadline:
            while len(acked) < before + 30:
                gevent.sleep(0.05)
    stop.set()
    sending.join(timeout=30)
    results = [r.get(timeout=60) for r in reading]
    assert acked == sorted(set(acked))
    for seen in results:
        assert seen == sorted(set(seen)), "a message came twice or out of order"
        assert set(acked) <= set(seen), "an acked message was lost"
    assert sum(r.reconnects for r in readers) >= 4  # every reader moved at least once... or twice
    for client in readers + [sender]:
        client.close()
