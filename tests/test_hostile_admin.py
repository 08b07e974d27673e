"""Hostile clients of the operator's side (issue 11, findings 10 and 11): the admin HTTP port,
/stats and /metrics under polling, connections from one address, secrets in logs and output.

Every test attacks a real ``gochat serve`` process over real sockets on 127.0.0.x, measures a
victim beside the attack (/health, a chatting pair, a client from another address) and the
bound that holds. The helpers of tests/test_robustness.py are reused (Peer, Pair, run_all...).
"""
from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import gevent
from gevent import socket as gsocket

from conftest import START_TIMEOUT, free_port
from gochat import admin
from gochat.config import load
from gochat.conn import CloseReason
from gochat.protocol import ERRORS
from test_robustness import FAST, Peer, admin_get, gget, metrics, no_tracebacks, run_all, stats, unique_nick
from test_robustness import pair, peers  # noqa: F401 (fixtures)

# The old code has no such names: these defaults let every test run there and fail on what it
# measures rather than on an import.
REQUEST_TIMEOUT = getattr(admin, "REQUEST_TIMEOUT", 5.0)
ADMIN_CAP = getattr(admin, "MAX_CONNECTIONS", 32)
HALF_SENT = b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow"  # the head never ends
IDLE = 3000  # idle connections: objects for a GC walk to visit, descriptors to list


def admin_socket(server, source: str | None = None, timeout: float = 10.0) -> gsocket.socket:
    return gsocket.create_connection(("127.0.0.1", server.admin_port), timeout=timeout,
                                     source_address=(source, 0) if source else None)


def timed_health(server, source: str = "127.0.0.2") -> float:
    started = time.monotonic()
    status, _ = admin_get(server, "/health", source=source)
    assert status == 200
    return time.monotonic() - started


def closed_after(sock: gsocket.socket, opened: float, limit: float) -> float | None:
    """Seconds from ``opened`` until the server closed ``sock`` (None: still open after ``limit``)."""
    sock.settimeout(max(0.01, opened + limit - time.monotonic()))
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return None
    except OSError:
        pass  # reset: closed with our unread request in its buffer
    return time.monotonic() - opened


# ---------------------------------------------------------------- one address, many silent connections


def test_silent_text_connections_from_one_address_leave_room_for_others_in_prod(start_server):
    """Finding 10: silent text-mode users (no idle timeout by protocol) from one address held
    max_connections forever. The prod profile caps each address; another address gets in."""
    per_ip = load("prod", environ={}).max_conns_per_ip or 100  # 0 (no cap) on the old code
    s = start_server(["--profile", "prod"], max_connections=per_ip + 10)

    def squatter(k: int) -> tuple[str, Peer]:
        p = Peer(s.port, codec="text", source="127.0.0.1")
        p.send_raw(f"{unique_nick('squat')}\n".encode())
        return p.read(timeout=10), p

    squatters = run_all(squatter, range(per_ip + 20), concurrency=50)
    answers = [line.split(":")[0] if line.startswith("!") else line.split()[1] for line, _ in squatters]
    assert answers.count("welcome") == per_ip, answers[-25:]
    assert answers.count("! too_many_connections") == 20
    victim = Peer(s.port, codec="text", source="127.0.0.2")
    victim.send_raw(b"victim\n")
    assert victim.read() == "* welcome victim"  # the old code: "! too_many_connections: ..."
    friend = Peer(s.port, source="127.0.0.3")
    friend.hello("friend")
    friend.send({"type": "join", "room": "lobby", "id": "j"})
    friend.expect("joined", id="j")
    victim.send_raw(b"still here\n")
    assert friend.expect("msg", room="lobby", text="still here")["from"] == "victim"
    assert metrics(s)['gochat_connections_rejected_total{reason="max_conns_per_ip"}'] == 20
    for _, p in squatters:
        p.close()
    no_tracebacks(s)


# ---------------------------------------------------------------- the admin HTTP port


def test_half_sent_admin_requests_are_cut_off_while_health_answers(start_server):
    """Finding 10: 50 half-sent requests were held 30 s (forever). As many as fit under the
    connection cap are each closed after REQUEST_TIMEOUT; /health from another address
    answers meanwhile (the cap itself: the next test)."""
    s = start_server()
    baseline = statistics.median(timed_health(s) for _ in range(5))
    count = ADMIN_CAP - 4  # room for the health checks beside them
    opened = time.monotonic()
    attackers = [admin_socket(s) for _ in range(count)]
    for sock in attackers:
        sock.sendall(HALF_SENT)
    during = [timed_health(s) for _ in range(5)]
    assert max(during) < max(20 * baseline, 0.5), (baseline, during)
    lifetimes = run_all(lambda sock: closed_after(sock, opened, REQUEST_TIMEOUT + 3), attackers)
    held = [t for t in lifetimes if t is None]
    assert not held, f"{len(held)} of {count} half-sent requests still held after {REQUEST_TIMEOUT + 3} s"
    assert min(lifetimes) > REQUEST_TIMEOUT * 0.8 and max(lifetimes) < REQUEST_TIMEOUT + 2, lifetimes
    assert metrics(s)['gochat_admin_refused_total{reason="request_timeout"}'] == count
    for sock in attackers:
        sock.close()
    no_tracebacks(s)


def test_admin_connections_past_the_cap_close_the_oldest_waiting_not_health(start_server):
    """Past the admin cap a new connection closes the one waiting longest for its request:
    100 half-sent requests hold at most ADMIN_CAP descriptors, and /health still answers."""
    s = start_server()
    baseline = statistics.median(timed_health(s) for _ in range(5))
    attackers = []
    opened = time.monotonic()
    for _ in range(100):
        sock = admin_socket(s)
        sock.sendall(HALF_SENT)
        attackers.append(sock)
    during = [timed_health(s) for _ in range(10)]  # each closes one more attacker
    assert max(during) < max(20 * baseline, 0.5), (baseline, during)
    lifetimes = run_all(lambda sock: closed_after(sock, opened, 1.0), attackers)
    still_open = sum(1 for t in lifetimes if t is None)
    assert still_open <= ADMIN_CAP - 1, f"{still_open} admin connections held, cap {ADMIN_CAP}"
    assert still_open and all(t is None for t in lifetimes[-still_open:]), "the newest must be the ones kept"
    m = metrics(s)
    assert m["gochat_admin_connections"] <= ADMIN_CAP
    assert m['gochat_admin_refused_total{reason="max_connections"}'] >= 100 - ADMIN_CAP
    for sock in attackers:
        sock.close()
    no_tracebacks(s)


def test_admin_answers_only_loopback_host_names(start_server):
    """DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends Host: evil.example;
    it gets 421, and loopback names with any port (an SSH tunnel's too) or none get 200."""
    s = start_server()
    port = s.admin_port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::2]", "10.0.0.1"):
        status, body = admin_get(s, "/stats", host=host)
        assert status == 421, (host, status, body[:80])
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", "[::1]", f"[::1]:{port}",
                 "localhost:8080", None):
        status, body = admin_get(s, "/stats", host=host)
        assert status == 200 and json.loads(body)["connections"] == 0, (host, status)
    assert metrics(s)['gochat_admin_refused_total{reason="bad_host"}'] == 5


# ---------------------------------------------------------------- /stats and /metrics cost


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used (user + system, /proc: 10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_per_request(server, path: str, rounds: int) -> float:
    """The server's CPU time per GET of ``path``: immune to the scheduling noise of a shared
    machine that wall-clock timing of a few milliseconds is not (rounds span 100s of ms)."""
    before = cpu_seconds(server.proc.pid)
    for _ in range(rounds):
        gget(server, path)
    return (cpu_seconds(server.proc.pid) - before) / rounds


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def test_polling_stats_and_metrics_costs_no_heap_walk_and_spares_a_chatting_pair(start_server, pair):
    """Finding 10: /stats walked the whole GC heap (and listed every descriptor) per call, so a
    scrape cost time in proportion to every object the server holds, and every client paid it
    while the status page polled. /stats?walk=1 still does the walk: the proxy for that cost."""
    s = start_server(rate=FAST, burst=FAST, resume_window=0)
    empty = server_cpu_per_request(s, "/stats", 100)
    healthy = pair(s.port)
    idlers = run_all(lambda k: (p := Peer(s.port), p.hello(unique_nick("idle")))[0], range(IDLE), concurrency=100)
    full = server_cpu_per_request(s, "/stats", 100)
    walked = server_cpu_per_request(s, "/stats?walk=1", 15)
    healthy.start(150, pause=0.005)
    healthy.check(limit=5)
    alone = percentile(healthy.latencies, 0.9)
    polling = True

    def poll() -> int:  # /stats and /metrics, up to 50 times a second: status pages and scrapers
        polls = 0
        while polling:
            gget(s, "/metrics" if polls % 2 else "/stats")
            polls += 1
            gevent.sleep(0.02)
        return polls

    poller = gevent.spawn(poll)
    healthy.start(150, pause=0.005)
    healthy.check(limit=5)
    polling = False
    polls = poller.get(timeout=10)
    polled = percentile(healthy.latencies, 0.9)
    figures = (f"/stats: {empty * 1000:.2f} ms of CPU empty, {full * 1000:.2f} ms with {IDLE} idle connections, "
               f"{walked * 1000:.2f} ms with a GC walk and an fd listing; the pair's p90 round trip "
               f"{alone * 1000:.2f} ms alone, {polled * 1000:.2f} ms beside {polls} polls")
    assert polls >= 20, figures
    assert full - empty < (walked - empty) / 4, figures
    assert polled < 2 * alone + 0.010, figures
    for p in idlers:
        p.close()
    no_tracebacks(s)


def test_greenlet_bookkeeping_matches_a_gc_walk_on_a_busy_server(start_server, peers, chat):
    """/stats counts greenlets from their owners' bookkeeping; a GC walk (/stats?walk=1) finds
    every one. They must agree with parked and reading connections, a writer blocked on a
    client that does not read, sessions awaiting resume, refusals and admin requests."""
    s = start_server(rate=FAST, burst=FAST, resume_window=30, max_conns_per_ip=60, max_outbound_bytes=8 * 2**20)
    parked = [chat(s.port, f"parked{k}", room="busy") for k in range(10)]
    for k in range(5):  # sessions awaiting resume, each with its timer
        gone = chat(s.port, f"gone{k}", room="busy")
        gone.sock.close()
    stuck = peers(s.port, rcvbuf=4096, source="127.0.0.2")  # reads nothing: the server needs a writer
    stuck.hello("stuck")
    stuck.send({"type": "join", "room": "flood", "id": "j"})
    stuck.expect("joined", id="j")
    sender = chat(s.port, "sender", room="flood")
    text = "w" * 4000
    for _ in range(1500):  # 6 MB: past the kernel's buffers (~3 MB), below max_outbound_bytes
        sender.send_nowait({"type": "msg", "room": "flood", "text": text})
    sender.send("flood", "last")
    # past max_conns_per_ip, silent connections wait in the refusers' pool
    over = [gsocket.create_connection(("127.0.0.1", s.port)) for _ in range(55)]
    slow_admin = admin_socket(s)
    slow_admin.sendall(HALF_SENT)
    for _ in range(3):
        now = gget(s, "/stats?walk=1")[1]
        owners = now["greenlets_by_owner"]
        assert sum(owners.values()) == now["greenlets"], now
        assert now["parked_connections"] >= len(parked), now
        assert owners["writers"] >= 1 and owners["resume_timers"] == 5 and owners["refusers"] >= 1, owners
        gevent.sleep(0.2)
    for sock in over + [slow_admin]:
        sock.close()


# ---------------------------------------------------------------- secrets


def run_gochat(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gochat", *args], capture_output=True, text=True, timeout=30,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("GOCHAT_")}, **(env or {})})


def test_config_show_and_logs_never_print_secrets(start_server):
    """Finding 11: the Redis password was printed by `gochat config show` and in the
    "listening on" and "unreachable at start" log lines."""
    password, short, jwt_secret = "hunter2-redis-password", "pw1", "j" * 16 + "-jwt-secret-for-tests-0123"
    dead = free_port()  # nothing listens there: Redis is unreachable at start
    shown = run_gochat("config", "show", "--broker", f"redis://gochat:{password}@127.0.0.1:{dead}/0",
                       env={"GOCHAT_JWT_SECRET": jwt_secret})
    assert shown.returncode == 0, shown.stderr
    assert password not in shown.stdout and jwt_secret not in shown.stdout, shown.stdout
    assert f"redis://gochat:***@127.0.0.1:{dead}/0" in shown.stdout

    # A 3-character password: too short for the log scrubber, so every line that names the
    # broker must mask it itself.
    url = f"redis://:{short}@127.0.0.1:{dead}/0?db=0"
    masked = f"redis://:***@127.0.0.1:{dead}/0?db=0"
    s = start_server(broker=url, jwt_secret=jwt_secret)
    s.wait_for_log(r"unreachable at start")
    assert stats(s)["broker"] == masked
    leaked = [line for line in s.lines if f":{short}@" in line or jwt_secret in line]
    assert not leaked, leaked
    assert any(masked in line for line in s.lines if "listening on" in line), s.lines


def test_a_one_byte_hs256_secret_is_refused_at_start():
    """Finding 11: `--jwt-secret x` was accepted; anyone could forge tokens with one guess."""
    proc = subprocess.Popen([sys.executable, "-m", "gochat", "serve", "--port", "0", "--admin-port", "0",
                             "--auth", "jwt", "--jwt-secret", "x"], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + START_TIMEOUT
        for line in proc.stderr:  # ends when the process exits
            lines.append(line)
            assert "listening on" not in line, "a 1-byte HS256 secret was accepted:\n" + "".join(lines)
            assert time.monotonic() < deadline
        assert proc.wait(10) == 2, lines
    finally:
        proc.kill()
        proc.wait()
    error = "".join(lines)
    assert re.search(r"jwt_secret is 1 bytes: an HS256 secret needs at least 32", error), error


# ---------------------------------------------------------------- counters at zero


def test_labelled_counters_are_exported_at_zero_from_the_start(start_server):
    """PITFALLS, Prometheus: rate() over a series that appears with its first event misses that
    event, so the alerts on error codes and close reasons must see every series at 0 first."""
    s = start_server()
    m = metrics(s)
    for code in ERRORS:
        assert m.get(f'gochat_errors_sent_total{{code="{code}"}}') == 0, code
    for reason in CloseReason:
        assert m.get(f'gochat_connections_closed_total{{reason="{reason.value}"}}') == 0, reason
    for reason in ("max_connections", "max_conns_per_ip"):
        assert m.get(f'gochat_connections_rejected_total{{reason="{reason}"}}') == 0, reason
    for reason in ("max_connections", "request_timeout", "bad_host"):
        assert m.get(f'gochat_admin_refused_total{{reason="{reason}"}}') == 0, reason
