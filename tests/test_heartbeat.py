"""Adaptive heartbeat: each connection's ping interval follows its measured round trips."""
from __future__ import annotations

import itertools

import gevent

from gochat.config import Config
from gochat.heartbeat import Heartbeat


def pong_after(client, delays, pings):
    """Answer `pings` server pings, each after the next delay: a slow or jittery link."""
    for delay in itertools.islice(itertools.cycle(delays), pings):
        ping = client.expect("ping", timeout=5)
        gevent.sleep(delay)  # the link's latency is what is under test
        client.send({"type": "pong", "ts": ping["ts"]})


def test_profiles_follow_rtt_and_jitter(start_server, raw):
    s = start_server(heartbeat=0.1, idle_timeout=2, heartbeat_mode="adaptive", heartbeat_high_rtt=0.08,
                     heartbeat_jitter=0.03)
    links = {"fast": [0], "slow": [0.12], "jittery": [0, 0.07]}
    clients = {}
    for name in links:
        clients[name] = c = raw(s.port)
        c.send({"type": "hello", "nick": name})
        c.expect("welcome")
    gevent.joinall([gevent.spawn(pong_after, clients[n], links[n], 8) for n in links], raise_error=True)
    assert s.stats()["heartbeat_profiles"] == {"stable": 1, "high_latency": 1, "jittery": 1}


def test_fixed_mode_never_adapts(start_server, raw):
    s = start_server(heartbeat=0.1, idle_timeout=2, heartbeat_high_rtt=0.05)
    c = raw(s.port)
    c.send({"type": "hello", "nick": "slowpoke"})
    c.expect("welcome")
    pong_after(c, [0.08], 5)
    assert s.stats()["heartbeat_profiles"] == {"stable": 1}


def test_intervals_scale_with_the_profile():
    hb = Heartbeat(Config(heartbeat=30, idle_timeout=90, heartbeat_mode="adaptive", heartbeat_high_rtt=1.0,
                          heartbeat_jitter=0.2))
    assert (hb.interval, hb.idle_timeout) == (30, 90)
    for rtt in (2.0, 2.1, 2.0):
        hb.observe(rtt)
    assert (hb.profile, hb.interval, hb.idle_timeout) == ("high_latency", 60, 180)
    hb = Heartbeat(Config(heartbeat=30, idle_timeout=90, heartbeat_mode="adaptive"))
    for rtt in (0.01, 0.9, 0.01, 0.9, 0.01, 0.9):
        hb.observe(rtt)
    assert (hb.profile, hb.interval, hb.idle_timeout) == ("jittery", 15, 45)
