"""Listening, accepting, connection caps, signals and the graceful drain.

Life cycle (uvicorn's startup / main loop / shutdown): ``start`` binds and begins accepting;
``serve_forever`` waits for a signal; the first SIGTERM or SIGINT runs ``drain`` (PROTOCOL.md
section 6), a second one exits at once with status 1; SIGHUP reloads the TLS certificate.
Signal handlers only spawn the work.

``StreamServer`` spawns one greenlet per accepted connection into a ``gevent.pool.Pool``:
Go's ``go handleConn(conn)`` under a semaphore. The caps themselves are checked here, not by
the pool: a full pool would stop accepting and leave clients hanging in the kernel backlog,
where PROTOCOL.md wants them told ``too_many_connections``. A connection with nothing to
read parks (conn.py): its greenlet ends and a later one, from the same pool, picks it up,
so the pool counts the connections being served at this moment, ``connections`` all of them.

TLS: one ``SSLContext`` is built at start and rebuilt on SIGHUP; the listener accepts plain
TCP and each connection does its own handshake (conn.py), so the caps and
``handshake_timeout`` apply to it. gevent's ``StreamServer(ssl_context=...)`` would instead
handshake in the handler greenlet before any of our code runs: no deadline, no cap, and
every failure a traceback.
"""
from __future__ import annotations

import gc
import logging
import os
import random
import resource
import signal
import socket
import ssl
import time
from collections import Counter
from typing import Callable

import gevent
import greenlet
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import Event
from gevent.pool import Group, Pool
from gevent.server import StreamServer

from gochat import broker as brokers
from gochat import metrics
from gochat.admin import MAX_CONNECTIONS as ADMIN_MAX_CONNECTIONS
from gochat.admin import AdminServer
from gochat.auth import jwt_authenticator
from gochat.broker import BrokerUnavailable
from gochat.config import Config
from gochat.conn import CloseReason, Connection, Flusher, handshake_failure
from gochat.hub import Hub
from gochat.protocol import Decoder, ProtocolError, encode

log = logging.getLogger("gochat.server")

REFUSERS = 512  # refused clients waiting to show their codec at once, at most (19,300 clients fit 20,000 fds)
SESSIONS_PER_CONNECTION = 2  # default max_sessions: one awaiting resume beside each live one
ACCEPT_HEADROOM = 64  # handler greenlets beyond max_connections: a refusal starts in one, then moves out
REJECT_READ_TIMEOUT = 2.0  # seconds a refused client gets to show its codec (a TLS one: handshake included)
TLS_MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# Descriptors kept besides the clients' (the open-file budget): the standard streams, the
# event loop, the listeners and logs; the Redis broker's pool (broker/redis.py POOL_SIZE, 64)
# and its pub/sub connection; every connection the admin port may hold at once.
BASE_FDS = 20
BROKER_FDS = 65
FD_RESERVE = BASE_FDS + BROKER_FDS + ADMIN_MAX_CONNECTIONS
REJECT_REASONS = ("max_connections", "max_conns_per_ip")  # gochat_connections_rejected_total's reasons
DRAIN_POLL = 0.05  # seconds between checks that every client's output is written
RECONNECT_AFTER_MS = (1000, 5000)  # jittered so that clients do not come back as one storm
TICK_MIN, TICK_MAX = 0.02, 1.0  # seconds between deadline sweeps


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one; returns (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


class Acceptor(StreamServer):
    """gevent's StreamServer, except that a socket handed over to a parked connection stays open.

    StreamServer closes each accepted socket when the handler greenlet it spawned returns;
    a parked connection outlives that greenlet and closes its socket itself. The handler
    names the socket it handed over just before returning, and this close, which runs in
    the same greenlet right after it with no switch in between, skips that one.
    """

    handed_over: socket.socket | None = None

    def do_close(self, sock: socket.socket, *args: object) -> None:
        if sock is self.handed_over:
            self.handed_over = None
            return
        sock.close()


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The chat port's TLS context: built once (at start, then on SIGHUP), shared by every connection.

    gevent's ``SSLContext`` makes SSLSockets that wait cooperatively. Reading the files and
    building a context per connection, as ``StreamServer(certfile=...)`` did, cost more CPU
    than the handshake itself (server CPU per TLS connect: ~1.8 ms then, ~0.8 ms now).
    """
    context = gssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_MINIMUM_VERSION
    # A TCP EOF without close_notify ends the input like any EOF. OpenSSL 3 would otherwise
    # answer it with a fatal decode_error alert and refuse to write again: a client that only
    # half-closed, or a reader woken by our own SHUT_RD (gevent wakes it one loop turn later,
    # so it can read that EOF first), would lose the error or the replies it is still owed.
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    context.load_cert_chain(cert_file, key_file)
    return context


def set_accepted_socket_options(listener: socket.socket) -> None:
    """TCP_NODELAY (no Nagle + delayed-ACK stalls) and SO_KEEPALIVE (finds dead text-mode
    peers) for every client socket, set once on the listener: Linux copies both to each
    accepted socket, which saves two syscalls per connection on the connect path."""
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def listening_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A bound, listening socket; SO_REUSEPORT is set before bind, which gevent's own listener cannot do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(socket.SOMAXCONN)
    return sock


_frozen_greenlets: list[greenlet.greenlet] = []  # alive at start-up, hidden from gc.get_objects() by the freeze


def freeze_startup_objects() -> None:
    """Put everything alive now (modules, classes, config: ~37,000 objects) out of the collector's sight.

    They live as long as the process, and every full collection, a pause for every client,
    is ~7 ms shorter without them (gc.freeze; Instagram's trick).
    """
    gc.collect()
    _frozen_greenlets[:] = [obj for obj in gc.get_objects() if isinstance(obj, greenlet.greenlet)]
    gc.freeze()


def count_greenlets() -> int:
    """Every live greenlet in the process: a full GC walk, time in proportion to every object the
    process holds. Only for /stats?walk=1, never per scrape (Server.greenlets is the cheap count)."""
    tracked = sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet.greenlet) and not obj.dead)
    return tracked + sum(1 for g in _frozen_greenlets if not g.dead)


def count_open_files(walk: bool = False) -> int:
    """File descriptors this process holds, sockets included (Linux /proc).

    Since Linux 6.2 the size that stat() reports for /proc/self/fd is the count, at no cost
    per descriptor; listing the directory costs ~4.5 µs per descriptor, per scrape.
    ``walk``, or an older kernel (size 0): the listing.
    """
    try:
        if not walk:
            counted = os.stat("/proc/self/fd").st_size
            if counted > 0:
                return counted
        return len(os.listdir("/proc/self/fd")) - 1  # less the descriptor of the listing itself
    except OSError:
        return -1


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc), for /stats."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return -1


class Server:
    def __init__(self, config: Config, listener: socket.socket | None = None) -> None:
        self.config = config
        self.started = time.time()
        self.nofile = raise_nofile_limit()
        self.max_connections = self._connection_cap()
        if config.max_sessions is None:  # section 6's default, from the caps this process really has
            open_files = self.nofile[0] if config.max_connections == 0 else self.max_connections
            config = self.config = config.replace(max_sessions=SESSIONS_PER_CONNECTION * open_files)
        self.broker = brokers.create(config)
        self.flusher = Flusher()
        self.hub = Hub(self.broker, self.flusher, config, jwt_authenticator(config))
        self.connections: set[Connection] = set()
        self.per_ip: Counter[str] = Counter()
        # The pools bound the worst case: never more sockets than descriptors (accept() must
        # not fail with EMFILE); beyond them, new clients wait in the kernel's backlog.
        self.refusers = Pool(self._refusers_size())
        self.pool = Pool(min(self.max_connections + ACCEPT_HEADROOM, self._fd_budget() - self.refusers.size))
        self.overflow_readers = Group()  # readers started outside the pool when it was full
        self.draining = False
        self.drainer: gevent.Greenlet | None = None
        self.done = Event()
        self._signals = 0
        # Connections take the context current at their accept; SIGHUP replaces it (reload_tls).
        self.tls_context = server_tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        if listener is None:  # our own socket: SOMAXCONN backlog (gevent's default is 128), SO_REUSEPORT for workers
            listener = listening_socket(config.host, config.port,
                                        reuse_port=os.environ.get("GOCHAT_REUSE_PORT") == "1")
        set_accepted_socket_options(listener)
        self.stream_server = Acceptor(listener, self._handle, spawn=self.pool)
        # Accepted sockets not yet counted in `connections` are at most one accept batch:
        # the pool's headroom covers them, so a parked connection's reader always finds room.
        self.stream_server.max_accept = ACCEPT_HEADROOM
        self._all_closed = Event()
        self.admin: AdminServer | None = None
        self.ticker: gevent.Greenlet | None = None
        self._register_metrics()

    def _fd_budget(self) -> int:
        """Descriptors for client sockets: the soft limit less what the process needs besides."""
        return max(2, self.nofile[0] - FD_RESERVE)

    def _refusers_size(self) -> int:
        return max(1, min(REFUSERS, self._fd_budget() // 8))

    def _connection_cap(self) -> int:
        soft, hard = self.nofile
        fits = max(1, self._fd_budget() - self._refusers_size() - ACCEPT_HEADROOM)
        log.info("open-file limit: soft %d, hard %d", soft, hard)
        wanted = self.config.max_connections
        if wanted == 0:
            return fits
        if wanted > fits:
            log.warning("max_connections %d does not fit the open-file limit %d: at most %d connections "
                        "will be served (raise the hard limit, e.g. LimitNOFILE in systemd)", wanted, soft, fits)
            return fits
        return wanted

    def _register_metrics(self) -> None:
        metrics.connections_closed.declare(reason.value for reason in CloseReason)
        metrics.connections_rejected.declare(REJECT_REASONS)
        metrics.gauge("gochat_connections", "Open client connections", lambda: len(self.connections))
        metrics.gauge("gochat_sessions", "Sessions on this node", lambda: len(self.hub.sessions))
        metrics.gauge("gochat_sessions_awaiting_resume", "Sessions without a connection",
                      lambda: self.hub.awaiting_resume)
        metrics.gauge("gochat_rooms", "Rooms with members on this node", lambda: len(self.hub.local_members))
        metrics.gauge("gochat_handler_greenlets", "Connection handler greenlets", lambda: len(self.pool))
        metrics.gauge("gochat_greenlets", "Greenlets the server owns (Server.greenlets)",
                      lambda: sum(self.greenlets().values()))
        metrics.gauge("gochat_open_files", "File descriptors held by the process", count_open_files)
        metrics.gauge("gochat_broker_up", "1 while the broker is reachable", lambda: float(self.broker.available))
        metrics.gauge("gochat_draining", "1 while the server drains", lambda: float(self.draining))

    # ------------------------------------------------------------ life cycle

    @property
    def address(self) -> tuple[str, int]:
        return self.stream_server.address[:2]

    def tick_interval(self) -> float:
        """How often deadlines are checked: a tenth of the shortest timer, within bounds."""
        timers = [t for t in (self.config.handshake_timeout, self.config.heartbeat, self.config.idle_timeout) if t > 0]
        return min(TICK_MAX, max(TICK_MIN, min(timers, default=TICK_MAX) / 10))

    def _tick(self) -> None:
        """One ticker for every connection's heartbeat and timeouts (Go: a time.Ticker).

        A timeout per blocked read would cost a timer object per connection and a timer
        start and stop per message; sweeping all connections once per tick costs far less.
        """
        interval = self.tick_interval()
        while True:
            gevent.sleep(interval)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check_deadlines(now)

    def start(self) -> None:
        freeze_startup_objects()
        self.ticker = gevent.spawn(self._tick)
        self.stream_server.start()
        if self.config.admin_port:
            self.admin = AdminServer(self)
            self.admin.start()
        host, port = self.address
        admin = f"{self.config.admin_host}:{self.admin.port}" if self.admin else "off"
        role = "gochat worker" if os.environ.get("GOCHAT_REUSE_PORT") == "1" else "gochat"
        log.info("%s listening on %s:%d (admin %s, broker %s, max_connections %d)",
                 role, host, port, admin, self.config.shown("broker"), self.max_connections)

    def serve_forever(self) -> int:
        """Run until a signal has drained the server; the exit status (0, or 1 for a second signal)."""
        for signum in (signal.SIGTERM, signal.SIGINT):  # first: a signal during start-up still drains
            gevent.signal_handler(signum, self._on_signal, signum)
        gevent.signal_handler(signal.SIGHUP, self._on_sighup)
        self.start()
        self.done.wait()
        return 0

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(1)  # a second signal: stop now, drain or not (section 6)
        log.info("%s: draining", signal.Signals(signum).name)
        self.drainer = gevent.spawn(self.drain)

    def _on_sighup(self) -> None:
        gevent.spawn(self.reload_tls)

    def reload_tls(self) -> None:
        """SIGHUP: read the certificate and key again, so they rotate without a restart.

        New connections get the new context; established ones keep their session. A file
        that fails to load (a half-written rotation, a key not matching its certificate)
        leaves the old context in place, and a later SIGHUP tries again.
        """
        if not self.config.tls_cert:
            log.info("SIGHUP: no TLS configured, nothing to reload")
            return
        try:
            self.tls_context = server_tls_context(self.config.tls_cert, self.config.tls_key)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error("SIGHUP: TLS reload failed, keeping the previous certificate: %s", exc)
            return
        log.info("SIGHUP: TLS certificate reloaded from %s", self.config.tls_cert)

    def drain(self) -> None:
        """Graceful shutdown, in the order of PROTOCOL.md section 6, in lame-duck style.

        Every client is told at once; the closes are then spread over ``drain_spread``
        seconds (NATS lame-duck mode), each client's ``reconnect_after`` pointing past its
        own close plus jitter, so that reconnects reach the other nodes as a trickle,
        not a storm. Everything ends by ``drain_timeout``.
        """
        self.draining = True
        self.stream_server.close()
        started = time.monotonic()
        deadline = started + self.config.drain_timeout
        spread = min(self.config.drain_spread, self.config.drain_timeout)
        conns = list(self.connections)
        random.shuffle(conns)
        schedule = []
        for i, conn in enumerate(conns):
            close_at = spread * i / len(conns)
            conn.begin_drain(int(close_at * 1000) + random.randint(*RECONNECT_AFTER_MS))
            schedule.append((close_at, conn))
        while time.monotonic() < deadline and not all(c.flushed for c in self.connections):
            gevent.sleep(DRAIN_POLL)
        for close_at, conn in schedule:
            wait = min(started + close_at, deadline) - time.monotonic()
            if wait > 0:
                gevent.sleep(wait)
            conn.end_drain()
        self.refusers.kill(block=False)
        if self.connections and not self._all_closed.wait(timeout=2.0):
            self.pool.kill(block=True, timeout=1.0)
        self.ticker.kill()
        self.hub.stop()
        self.broker.stop()
        if self.admin:
            self.admin.stop()
        log.info("drained; exiting")
        self.done.set()

    # ------------------------------------------------------------ accepting

    def _handle(self, sock: socket.socket, address: tuple) -> None:
        """The greenlet of one accepted connection (``go handleConn(conn)``)."""
        metrics.connections_accepted.inc()
        ip = address[0]
        cap_ip = self.config.max_conns_per_ip
        if self.draining:
            return
        if len(self.connections) >= self.max_connections:
            self._reject(sock, address, "max_connections")
            return
        if cap_ip and self.per_ip[ip] >= cap_ip:
            self._reject(sock, address, "max_conns_per_ip")
            return
        conn = Connection(sock, address, self.config, self.hub, self.flusher, self._spawn_reader, self._forget,
                          tls=self.tls_context)
        self.connections.add(conn)
        self.per_ip[ip] += 1
        conn.run()
        if conn.parked:
            self.stream_server.handed_over = sock

    def _spawn_reader(self, run: Callable[[], None]) -> gevent.Greenlet:
        """A reader greenlet for a parked connection that became readable (called in the hub).

        The pool's sizing leaves room for one reader per connection; were it ever full, the
        reader starts outside it rather than block the hub.
        """
        if self.pool.full():
            return self.overflow_readers.spawn(run)
        return self.pool.spawn(run)

    def _forget(self, conn: Connection) -> None:
        """A connection has closed: it no longer counts against the caps."""
        self.connections.discard(conn)
        ip = conn.address[0]
        self.per_ip[ip] -= 1
        if not self.per_ip[ip]:
            del self.per_ip[ip]
        if self.draining and not self.connections:
            self._all_closed.set()

    def _reject(self, sock: socket.socket, address: tuple, reason: str) -> None:
        """Answer too_many_connections in the client's own codec, once its first bytes show it.

        The wait for those bytes runs in a pool of its own, off the accept path: refused
        clients, even a flood of silent ones, never hold the slots that serve everybody else.
        A refused TLS client is answered too, over TLS: the handshake is the refusers'
        work, within the same ``REJECT_READ_TIMEOUT``, so the client library and locust
        see why and back off (a handshake costs ~1 ms of CPU, and at most ``REFUSERS`` run
        at once). When that pool is full too, a plain client is answered only if its first
        bytes are already there, a TLS one is closed at once, and either way without waiting.
        """
        metrics.connections_rejected.inc(reason)
        if self.refusers.full():
            if self.tls_context is None:
                self._answer_rejected(sock, reason, 0.0)
            return
        fd = sock.detach()  # ours now: StreamServer's close after this handler returns is a no-op
        self.refusers.spawn(self._answer_detached, fd, address, reason, self.tls_context)

    def _answer_detached(self, fd: int, address: tuple, reason: str, tls: ssl.SSLContext | None) -> None:
        """One refusal in the refusers' pool: handshake (with TLS), read the codec, answer; all within the deadline."""
        sock = gsocket.socket(fileno=fd)
        try:
            with gevent.Timeout(REJECT_READ_TIMEOUT, False):
                if tls is not None:
                    sock = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                    sock.do_handshake()
                self._answer_rejected(sock, reason, None)
        except OSError as exc:  # the handshake failed: ssl.SSLError is an OSError
            metrics.tls_handshake_failures.inc()
            log.debug("tls handshake failed %s:%s (refused, %s): %s", *address[:2], reason, handshake_failure(exc))
        finally:
            sock.close()

    def _answer_rejected(self, sock: socket.socket, reason: str, wait: float | None) -> None:
        decoder = Decoder(self.config.max_frame_bytes)
        sock.settimeout(wait)
        try:
            while decoder.codec is None:
                data = sock.recv(4096)
                if not data:
                    return
                decoder.receive_data(data)
                try:
                    decoder.next_event()
                except ProtocolError:
                    pass
            error = ProtocolError("too_many_connections", f"server connection limit reached ({reason})")
            metrics.errors_sent.inc(error.code)
            sock.sendall(encode(error.to_message(), decoder.codec))
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ------------------------------------------------------------ status

    def ready(self) -> tuple[bool, str | None]:
        if self.draining:
            return False, "draining"
        if not self.broker.available:
            return False, "broker"
        if len(self.connections) >= self.max_connections:
            return False, "full"
        return True, None

    def greenlets(self, awaiting: int | None = None) -> dict[str, int]:
        """The live greenlets this server owns, by owner, each counted from its owner's bookkeeping.

        Not by a GC walk (count_greenlets): that costs time in proportion to every object in
        the process, paid by every client at each scrape while the status page polls each
        second. Only the writers need a look at each connection (~0.25 µs each). A greenlet
        spawned somewhere new must be counted here: tests/test_hostile_admin.py compares the
        sum with the walk (/stats?walk=1) on a busy server.
        """
        own = (*_frozen_greenlets, self.ticker, self.drainer)
        return {
            "startup": sum(1 for g in own if g is not None and not g.dead),  # main, loop, broker, ticker, drain
            "readers": self._readers(),
            "refusers": len(self.refusers),
            "writers": sum(1 for conn in self.connections if not conn.flushed),  # at most one each
            # the hub's timer of each session awaiting resume (hub.detach)
            "resume_timers": self.hub.awaiting_resume if awaiting is None else awaiting,
            "admin": self.admin.greenlets() if self.admin else 0,
        }

    def _readers(self) -> int:
        """Reader greenlets: one per connection whose input is being read (the others are parked)."""
        return len(self.pool) + len(self.overflow_readers)

    def _heartbeat_profiles(self, connected: int) -> dict[str, int]:
        if self.config.heartbeat_mode == "fixed":  # no profile ever leaves "stable" (heartbeat.py)
            return {"stable": connected} if connected else {}
        return dict(Counter(conn.heartbeat.profile for conn in self.connections if conn.session))

    def stats(self, walk: bool = False) -> dict:
        """/stats, from counts the server keeps: no pass over the heap, and over the connections
        only for the writers (and the heartbeat profiles in adaptive mode).

        ``walk`` (``/stats?walk=1``, for leak hunting and the leak tests) counts greenlets by a
        GC walk and descriptors by listing them, the exact and dear way; ``greenlets_by_owner``
        still shows the bookkeeping beside it.
        """
        awaiting = self.hub.awaiting_resume
        greenlets = self.greenlets(awaiting)
        try:
            rooms: int | None = self.broker.room_count()
        except BrokerUnavailable:  # /stats and the status page still answer while Redis is down
            rooms = None
        return {
            "connections": len(self.connections),
            "sessions": len(self.hub.sessions),
            "sessions_awaiting_resume": awaiting,
            "rooms": rooms,
            "greenlets": count_greenlets() if walk else sum(greenlets.values()),
            "greenlets_by_owner": greenlets,
            "handler_greenlets": len(self.pool),
            # connections without a reader greenlet (a closing one's reader ends just after it)
            "parked_connections": max(0, len(self.connections) - self._readers()),
            "open_files": count_open_files(walk),
            "heartbeat_profiles": self._heartbeat_profiles(len(self.hub.sessions) - awaiting),
            "rss_bytes": rss_bytes(),
            "messages_in": self.hub.messages_posted,
            "deliveries": self.hub.deliveries,
            "uptime_s": round(time.time() - self.started, 3),
            "pid": os.getpid(),
            "max_connections": self.max_connections,
            "open_files_limit": self.nofile[0],
            "draining": self.draining,
            "broker": self.config.shown("broker"),
        }
