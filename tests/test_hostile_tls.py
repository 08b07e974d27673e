"""Hostile TLS clients: silent sockets, failed handshakes, certificate rotation under load.

The TLS handshake is part of a connection's life (PROTOCOL.md section 6): it runs under
``handshake_timeout`` and the connections in it count toward ``max_connections`` and
``max_conns_per_ip``. Each test attacks a real ``gochat serve`` process over real sockets
(127.0.0.2.. stand for other machines) while a victim, a TLS client of the client library
on 127.0.0.1, chats through it and is measured against its own baseline.
"""
from __future__ import annotations

import os
import signal
import ssl
import statistics
import time
import warnings

import gevent
from gevent import socket as gsocket

from conftest import make_certificate
from gochat.client import Client, wrap_tls
from gochat.server import ACCEPT_HEADROOM
from test_robustness import FAST, metrics, no_tracebacks, run_all, settle, stats, wait_for_log_count

CONNECT_TIMEOUT = 5.0  # a victim that cannot connect within this has been locked out


def tls_context(cert: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert)


def visit(port: int, context: ssl.SSLContext, nick: str, messages: int = 5) -> tuple[Client, list[float]]:
    """A TLS client connects, says hello, joins and posts: (the client, seconds to each ack; the first
    one includes the connect, the handshake, hello and join)."""
    started = time.monotonic()
    client = Client("127.0.0.1", port, tls=context, timeout=CONNECT_TIMEOUT)
    client.hello(nick=nick)
    client.join("victims")
    latencies = []
    for k in range(messages):
        client.send("victims", f"{nick} {k}")
        latencies.append(time.monotonic() - started)
        started = time.monotonic()
    return client, latencies


def silent_socket(port: int, source: str) -> gsocket.socket:
    """A TCP connection that never sends a byte: no ClientHello, nothing."""
    sock = gsocket.socket()
    sock.bind((source, 0))
    sock.settimeout(CONNECT_TIMEOUT)
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock: gsocket.socket, timeout: float) -> tuple[bytes, float]:
    """(every byte the server sent, seconds until it closed); fails if it is still open after ``timeout``."""
    started = time.monotonic()
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"not closed within {timeout} s") from None
    finally:
        sock.close()
    return b"".join(chunks), time.monotonic() - started


# ---------------------------------------------------------------- silent sockets

HANDSHAKE_TIMEOUT = 3.0
CAP, PER_IP = 100, 20
ATTACKERS = [f"127.0.0.{k}" for k in range(2, 6)]
# More silent sockets than the handler greenlets the server used to have for them all
# (max_connections + ACCEPT_HEADROOM), where each one held a greenlet in its handshake.
SILENT = CAP + ACCEPT_HEADROOM + 16
HELD = PER_IP * len(ATTACKERS)  # what the per-IP cap lets in


def test_silent_tls_sockets_are_capped_and_timed_out_while_a_tls_client_chats(start_server, certificate):
    cert, key = certificate
    s = start_server(tls_cert=cert, tls_key=key, handshake_timeout=HANDSHAKE_TIMEOUT, max_connections=CAP,
                     max_conns_per_ip=PER_IP, rate=FAST, burst=FAST)
    context = tls_context(cert)
    first, baseline = visit(s.port, context, "before")
    first.close()

    silent = [silent_socket(s.port, ATTACKERS[k % len(ATTACKERS)]) for k in range(SILENT)]
    attack_began = time.monotonic()
    # Accepting, and a handler greenlet returning to the pool once its connection parked,
    # make no client-visible event: poll /stats (bounded) until they are done. The silent
    # ones are connections in their handshake, yet none holds a greenlet.
    settle(s, {"connections": HELD, "parked_connections": HELD, "handler_greenlets": 0},
           keys=("connections", "parked_connections", "handler_greenlets"))
    assert metrics(s)['gochat_connections_rejected_total{reason="max_conns_per_ip"}'] == SILENT - HELD

    victim, during = visit(s.port, context, "victim")  # gets in while the attackers wait
    assert during[0] < max(20 * baseline[0], 1.0), (baseline, during)
    assert statistics.median(during[1:]) < max(20 * statistics.median(baseline[1:]), 0.2), (baseline, during)

    # Connections in their handshake count toward max_connections: fill it from one more
    # address, and a TLS client beyond the cap is refused in its codec, over TLS.
    filler = [silent_socket(s.port, "127.0.0.6") for _ in range(CAP - HELD - 1)]
    settle(s, {"connections": CAP}, keys=("connections",))
    refused = Client("127.0.0.1", s.port, tls=context, timeout=CONNECT_TIMEOUT)
    refused.send_nowait({"type": "hello", "nick": "late"})
    assert refused.expect("error")["code"] == "too_many_connections"
    refused.close()
    assert time.monotonic() - attack_began < HANDSHAKE_TIMEOUT, "too slow to see the attackers held"

    # handshake_timeout closes every silent one, without a word (section 1); the refused ones
    # were closed by the refusers' own deadline.
    closes = run_all(lambda sock: read_until_closed(sock, HANDSHAKE_TIMEOUT + 5), silent + filler)
    assert all(data == b"" for data, _ in closes)
    wait_for_log_count(s, r"reason=handshake_timeout", CAP - 1)
    settle(s, {"connections": 1}, keys=("connections",))
    assert victim.send("victims", "still here")["seq"] > 0
    late, _ = visit(s.port, context, "late")
    late.close()
    victim.close()
    no_tracebacks(s)


# ---------------------------------------------------------------- failed handshakes

PER_KIND = 40


def tls11_context() -> ssl.SSLContext:
    """A client that speaks nothing newer than TLS 1.1 (OpenSSL 3 sends it only at security level 0)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def bad_handshake(port: int, kind: str, source: str) -> bytes:
    """One client that fails the handshake its own way; what the server sent it in clear."""
    sock = gsocket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT, source_address=(source, 0))
    if kind == "tls1.1":
        try:
            wrap_tls(sock, tls11_context(), "127.0.0.1").close()
        except ssl.SSLError:
            return b""
        raise AssertionError("a TLS 1.1 handshake succeeded")
    if kind == "scanner":  # connects and leaves
        sock.close()
        return b""
    sock.sendall({"json": b'{"type":"hello","v":1,"nick":"plain"}\n',
                  "http": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"}[kind])
    return read_until_closed(sock, CONNECT_TIMEOUT)[0]


def test_failed_handshakes_are_one_debug_line_and_a_counter_each(start_server, certificate):
    cert, key = certificate
    s = start_server(["--log-level", "debug"], tls_cert=cert, tls_key=key, rate=FAST, burst=FAST)
    assert metrics(s)["gochat_tls_handshake_failures_total"] == 0  # exported before the first failure
    victim, baseline = visit(s.port, tls_context(cert), "victim", messages=20)
    quiet = stats(s)

    kinds = ["json", "http", "tls1.1", "scanner"]
    jobs = [(kinds[k % len(kinds)], ATTACKERS[k % len(ATTACKERS)]) for k in range(PER_KIND * len(kinds))]
    attack = gevent.spawn(run_all, lambda job: bad_handshake(s.port, *job), jobs, 50)
    during = []
    while not attack.ready():
        started = time.monotonic()
        victim.send("victims", "through the noise")
        during.append(time.monotonic() - started)
    sent_in_clear = attack.get()
    assert not any(b'"type"' in data for data in sent_in_clear)  # nothing in clear to a client that fails TLS
    assert statistics.median(during) < max(10 * statistics.median(baseline[1:]), 0.05), (baseline, during)

    total = len(jobs)
    wait_for_log_count(s, r"tls handshake failed 127\.0\.0\.[2-5]:", total)
    assert metrics(s)["gochat_tls_handshake_failures_total"] == total
    about_attackers = [line for line in s.lines if "127.0.0.2:" in line or "127.0.0.3:" in line
                       or "127.0.0.4:" in line or "127.0.0.5:" in line]
    assert len(about_attackers) == total  # one line each, at debug level: nothing at info
    assert all(" DEBUG " in line and "tls handshake failed" in line for line in about_attackers)
    reasons = " ".join(about_attackers)
    assert reasons.count("UNSUPPORTED_PROTOCOL") == PER_KIND, about_attackers[:8]
    assert reasons.count("WRONG_VERSION_NUMBER") + reasons.count("HTTP_REQUEST") == 2 * PER_KIND
    no_tracebacks(s)
    settle(s, quiet, keys=("connections", "open_files"))
    victim.close()


# ---------------------------------------------------------------- certificate rotation

RELOADS = 10


def install(source: tuple[str, str], live: tuple[str, str]) -> None:
    """Put a certificate and key in place the way a rotation does: new files renamed over the old."""
    for src, dst in zip(source, live):
        with open(src, "rb") as fh:
            data = fh.read()
        with open(dst + ".new", "wb") as fh:
            fh.write(data)
        os.replace(dst + ".new", dst)


def test_sighup_rotates_the_certificate_for_new_connections_and_keeps_the_old_ones(start_server, tmp_path):
    dirs = {name: tmp_path / name for name in ("a", "b", "live")}
    for directory in dirs.values():
        directory.mkdir()
    cert_a, cert_b = make_certificate(dirs["a"]), make_certificate(dirs["b"])
    live = (str(dirs["live"] / "cert.pem"), str(dirs["live"] / "key.pem"))
    install(cert_a, live)
    s = start_server(tls_cert=live[0], tls_key=live[1], rate=FAST, burst=FAST)
    trusts_a, trusts_b = tls_context(cert_a[0]), tls_context(cert_b[0])
    existing, _ = visit(s.port, trusts_a, "existing")

    install(cert_b, live)
    for k in range(RELOADS):  # the existing client posts through every reload
        s.signal(signal.SIGHUP)
        wait_for_log_count(s, r"SIGHUP: TLS certificate reloaded", k + 1)
        assert existing.send("victims", f"through reload {k}")["seq"] > 0
    newcomer, _ = visit(s.port, trusts_b, "newcomer")  # verifies against B only
    assert existing.expect("msg", room="victims", **{"from": "newcomer"})["text"] == "newcomer 0"
    try:
        Client("127.0.0.1", s.port, tls=trusts_a, timeout=CONNECT_TIMEOUT).close()
        raise AssertionError("a new connection still got certificate A")
    except ssl.SSLCertVerificationError:
        pass

    # A broken rotation (a key that does not match the certificate) keeps the working one.
    install((cert_b[0], cert_a[1]), live)
    s.signal(signal.SIGHUP)
    s.wait_for_log(r"ERROR .*SIGHUP: TLS reload failed, keeping the previous certificate")
    again, _ = visit(s.port, trusts_b, "again")
    assert existing.send("victims", "after the failed reload")["seq"] > 0
    assert s.proc.poll() is None
    for client in (existing, newcomer, again):
        client.close()
    no_tracebacks(s)


# ---------------------------------------------------------------- errors over TLS

IDLE = 50


def test_tls_clients_closed_for_idling_read_the_error_over_tls(start_server, certificate):
    """The server's close of a TLS connection (idle_timeout here, the drain, a takeover) keeps
    TLS up until the last byte: the error arrives as a TLS record, not in clear."""
    cert, key = certificate
    s = start_server(tls_cert=cert, tls_key=key, heartbeat=0, idle_timeout=1, rate=FAST, burst=FAST)
    context = tls_context(cert)
    clients = [Client("127.0.0.1", s.port, tls=context, timeout=CONNECT_TIMEOUT) for _ in range(IDLE)]
    for k, client in enumerate(clients):
        client.hello(nick=f"idler{k}")
    errors = run_all(lambda client: client.expect("error", timeout=5)["code"], clients)
    assert errors == ["idle_timeout"] * IDLE
    wait_for_log_count(s, r"reason=idle_timeout", IDLE)
    for client in clients:
        client.close()
    no_tracebacks(s)
