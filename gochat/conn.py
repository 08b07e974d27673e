"""One client connection: its reader loop, its output buffer, its heartbeat and its limits.

This is the only code that touches the connection's socket (STYLE.md rule 4). The handler
greenlet that ``StreamServer`` spawns for the connection (Go's ``go handleConn(conn)``) is
the reader. Heartbeats and timeouts are checked by the server's ticker through
:meth:`Connection.check_deadlines` (no timer per blocked read).

Parking: when a plain-TCP connection has nothing left to read, its reader greenlet ends and
the connection waits on a bare libev read watcher; the next byte (or a shutdown by the
ticker, a takeover or the drain) starts a new reader greenlet from the server's pool. This
is what Go's runtime does for a goroutine blocked in ``conn.Read`` (parked on the
netpoller), made explicit because a greenlet blocked in ``recv`` costs ~8.5 KiB of saved C
stack, frame page and greenlet object, where the watcher costs ~120 bytes: an idle
connection holds no greenlet at all (docs/performance.md, idle). TLS connections do not
park once their handshake has begun (a TLS record may be half read inside the SSL object,
invisible to the watcher).

TLS: the server accepts plain TCP and the connection does its own handshake, in its reader
greenlet while in HANDSHAKE, so the handshake is one more part of the connection's life:
counted by the server's caps from accept on, under ``handshake_timeout`` (the ticker closes
a silent one without a word, section 1), and a failure is one debug line and a counter,
not a traceback. Until the client's first bytes arrive there is no SSL object yet, so a
silent TLS client parks like a plain one and holds no greenlet.

Why not the Go way (a writer goroutine per client draining a channel)? In gevent a second
greenlet per connection doubles the idle cost and adds a switch per delivery. Instead
output goes into the connection's :class:`~gochat.outbox.Outbox` (bytes for replies, a
cursor into the room's feed for broadcasts) and the connection is marked dirty; once per
event-loop turn the :class:`Flusher` writes every dirty outbox with one non-blocking
``send`` (many messages, one syscall). Only when the kernel's socket buffer is full does a
writer greenlet exist, and it exits once the backlog is written. Either the flusher or
that writer writes, never both: one writer per socket at any time.

Output accounting, one rule for every byte (PROTOCOL.md section 6): ``owed`` is what the
connection was given and the kernel has not taken, in the outbox or still held by the
writer greenlet. Past ``max_outbound_bytes``:

- the client's own requests wait (backpressure, as a Go handler blocked in ``Write`` reads
  nothing more): the reader serves the next one only once the writer has written the
  backlog, so replies never pile up past the cap, however many requests were pipelined;
- anything else queued for it (a broadcast, a DM, presence, a ping) makes it a slow
  consumer: it is closed. So one message always fits, however large, and a connection
  holds at most ``max_outbound_bytes`` plus one message.

A writer that makes no progress for ``idle_timeout`` is a slow consumer too (Go's
``SetWriteDeadline``): a client that sends but does not read is not kept alive by its own
pongs.

Connection states (one table, below): HANDSHAKE (codec unknown) -> GREETING (codec known,
no session) -> SESSION -> DRAINING (server shutdown) -> CLOSED. Any state may close.
"""
from __future__ import annotations

import enum
import errno
import logging
import os
import socket
import ssl
import time
from typing import Any, Callable

import gevent
from gevent import Greenlet
from gevent import socket as gsocket

from gochat import metrics
from gochat.broker import BrokerUnavailable
from gochat.config import Config
from gochat.hub import Hub, RecipientRateLimited, Session, now_ms
from gochat.protocol import (
    NEED_DATA,
    Bye,
    Codec,
    Decoder,
    Dm,
    Hello,
    History,
    Join,
    Leave,
    Msg,
    Outgoing,
    Ping,
    Pong,
    ProtocolError,
    Rooms,
    Who,
    encode,
    encode_history,
    parse_request,
    parse_text_line,
    within_budget,
)
from gochat.heartbeat import Heartbeat
from gochat.limits import TokenBucket
from gochat.outbox import Outbox, RoomFeed

log = logging.getLogger("gochat.conn")

RECV_BYTES = 65536
INFINITY = float("inf")
PINGS_REMEMBERED = 4
CLOSE_FLUSH_TIMEOUT = 2.0  # seconds a closing connection may take to write what it owes
LINGER_TIMEOUT = 1.0  # seconds, and bytes, a connection closed for an error reads on after FIN
LINGER_MAX_BYTES = 1 << 20
TEXT_LOBBY = "lobby"
# Requests a reader serves before it lets every other greenlet and the flusher run once
# (Go's scheduler preempts a busy goroutine; a greenlet must yield): without it, a client
# that sends faster than the server can serve -- pongs take no token -- holds the loop.
FAIR_SHARE = 64
RATE_EXEMPT = ("pong", "bye")  # section 6: every request but these takes a token
# Tests prove that a failing handler closes only its own connection: with this set in the
# server's environment, a request of type "test_fault" raises inside the handler.
FAULT_INJECTION = os.environ.get("GOCHAT_TEST_FAULTS") == "1"


class State(enum.Enum):
    HANDSHAKE = "handshake"
    GREETING = "greeting"
    SESSION = "session"
    DRAINING = "draining"
    CLOSED = "closed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.HANDSHAKE: frozenset({State.GREETING, State.DRAINING, State.CLOSED}),
    State.GREETING: frozenset({State.SESSION, State.DRAINING, State.CLOSED}),
    State.SESSION: frozenset({State.DRAINING, State.CLOSED}),
    State.DRAINING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class CloseReason(str, enum.Enum):
    """Why a connection ended: a metric label and a log field, never free text (nats ClosedState)."""

    BYE = "bye"
    PEER_CLOSED = "peer_closed"
    PEER_RESET = "peer_reset"
    IO_ERROR = "io_error"
    TOO_LARGE = "too_large"
    AUTH_FAILED = "auth_failed"
    IDLE_TIMEOUT = "idle_timeout"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    SLOW_CONSUMER = "slow_consumer"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TAKEOVER = "takeover"
    SHUTDOWN = "shutdown"
    HANDLER_EXCEPTION = "handler_exception"
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"


# Nothing more can be written (the socket failed or the backlog was dropped), or the
# server's drain already spent drain_timeout flushing. A peer that closed may only have
# half-closed (nc at the end of its input): it still gets what it is owed.
NO_FLUSH_REASONS = frozenset({CloseReason.SLOW_CONSUMER, CloseReason.IO_ERROR, CloseReason.PEER_RESET,
                              CloseReason.SHUTDOWN})

ERROR_CLOSE_REASONS = {
    "too_large": CloseReason.TOO_LARGE,
    "auth_failed": CloseReason.AUTH_FAILED,
    "idle_timeout": CloseReason.IDLE_TIMEOUT,
    "handshake_timeout": CloseReason.HANDSHAKE_TIMEOUT,
    "slow_consumer": CloseReason.SLOW_CONSUMER,
    "rate_limited": CloseReason.RATE_LIMITED,
    "too_many_connections": CloseReason.TOO_MANY_CONNECTIONS,
}


class Flusher:
    """Writes every dirty connection once per event-loop turn: the coalescing of output.

    A broadcast to a thousand members marks a thousand buffers dirty; the writes happen
    after the current greenlet yields, so every message queued in the same turn leaves in
    the same ``send``.
    """

    def __init__(self) -> None:
        self._dirty: list[Connection] = []
        self._turn_end: list[Callable[[], None]] = []
        self._scheduled = False
        self._loop = gevent.get_hub().loop

    def at_turn_end(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` before each round of writes (the hub seals its room feeds there)."""
        self._turn_end.append(callback)

    def request(self) -> None:
        """Make sure a round of writes runs once the current greenlet yields."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.run_callback(self._run)

    def schedule(self, conn: "Connection") -> None:
        self._dirty.append(conn)
        self.request()

    def _run(self) -> None:
        self._scheduled = False
        for callback in self._turn_end:
            callback()
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()


class Connection:
    # Slots: an idle connection's own state is a few hundred bytes (the performance issue
    # measures memory per connection).
    __slots__ = ("config", "hub", "flusher", "spawn", "on_closed", "sock", "address", "opened", "state", "codec",
                 "session", "close_reason", "decoder", "bucket", "last_recv", "pings_unanswered", "pings_sent",
                 "heartbeat", "outbox", "_flush_scheduled", "_writer", "_unsent", "_progress", "_greenlet",
                 "_nonblocking", "_parking", "_served", "_tls")

    def __init__(self, sock: socket.socket, address: tuple, config: Config, hub: Hub, flusher: Flusher,
                 spawn: Callable[[Callable[[], None]], Greenlet], on_closed: Callable[["Connection"], None],
                 tls: ssl.SSLContext | None = None) -> None:
        # shared server state
        self.config = config
        self.hub = hub
        self.flusher = flusher
        self.spawn = spawn  # starts a reader greenlet for a parked connection (the server's pool)
        self.on_closed = on_closed  # tells the server this connection is gone
        # per-connection state, owned by this object
        self.sock = sock
        self.address = address
        self.opened = time.monotonic()
        self.state = State.HANDSHAKE
        self.codec: Codec | None = None
        self.session: Session | None = None
        self.close_reason: CloseReason | None = None
        self.decoder = Decoder(config.max_frame_bytes)
        self.bucket = TokenBucket(config.rate, config.burst, config.max_strikes)
        self.last_recv = self.opened
        self.pings_unanswered = 0
        self.pings_sent: list[int] = []  # ts of the last few pings: a slow pong may follow a newer ping
        self.heartbeat = Heartbeat(config)
        # output: what waits for the flusher, or for the writer greenlet while one exists
        self.outbox = Outbox(None)
        self._flush_scheduled = False
        self._writer: Greenlet | None = None
        self._unsent = 0  # bytes the writer greenlet holds that the kernel has not taken
        self._progress = 0.0  # when the writer last got bytes into the kernel (the write deadline)
        self._greenlet: Greenlet | None = None  # the reader while one runs; None while parked
        # A plain TCP socket can be written without blocking from the flusher, and read
        # without blocking, which is what lets the reader park; TLS can do neither (a record
        # may need a read, or sit half-read in the SSL object), so TLS output always goes
        # through the writer greenlet and TLS readers never park. The underlying socket is
        # non-blocking under gevent; one reference to it, not two bound methods (~140 bytes
        # per idle connection).
        self._nonblocking: socket.socket | None = None if tls else sock._sock
        self._parking: Any = None  # the read watcher a parked connection waits on, made at the first park
        self._served = 0  # requests served since this reader last let the others run (FAIR_SHARE)
        self._tls = tls  # the context to handshake with, until the handshake begins

    # ------------------------------------------------------------ state

    def _move(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"connection cannot go from {self.state.value} to {state.value}")
        if self.config.trace_connections:
            log.debug("conn %s:%s %s -> %s", *self.address[:2], self.state.value, state.value)
        self.state = state

    @property
    def nick(self) -> str | None:
        return self.session.nick if self.session else None

    # ------------------------------------------------------------ reading (the handler greenlet)

    def run(self) -> None:
        """One stretch of the connection's life in a reader greenlet: until it parks or closes.

        The first stretch runs in the greenlet StreamServer spawned for the connection, later
        ones in greenlets started when a parked connection becomes readable. An unexpected
        exception closes this connection only and is logged with its traceback: Go's
        ``defer recover()`` in ``handleConn``.
        """
        self._greenlet = gevent.getcurrent()
        parked = False
        try:
            if self._tls is not None and self.close_reason is None:
                parked = self._start_tls()
            if not parked and self.close_reason is None:
                parked = self._read_loop()
        except Exception:
            metrics.handler_exceptions.inc()
            log.exception("handler failed for %s:%s (nick %s)", *self.address[:2], self.nick)
            self.close_reason = self.close_reason or CloseReason.HANDLER_EXCEPTION
        finally:
            self._greenlet = None
            if not parked:
                self._finish()

    def _start_tls(self) -> bool:
        """The server's side of the TLS handshake; True when parked because nothing has arrived yet.

        Peeking at the plain socket costs one syscall and leaves the bytes for OpenSSL. Once they
        are there, the handshake runs to its end in this greenlet; the ticker's shutdown at
        ``handshake_timeout`` ends a client that stalls half way.
        """
        try:
            self.sock._sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            self._park()
            return True
        except OSError:
            pass  # the handshake meets the same error and says so
        context, self._tls = self._tls, None
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            self.sock.do_handshake()
        except OSError as exc:  # ssl.SSLError included
            if self.close_reason is None:  # not the ticker's timeout, nor the drain
                self.close_reason = CloseReason.TLS_HANDSHAKE_FAILED
                metrics.tls_handshake_failures.inc()
                log.debug("tls handshake failed %s:%s: %s", *self.address[:2], handshake_failure(exc))
        return False

    def _read_loop(self) -> bool:
        """Read and serve until the connection closes (False) or parks with nothing to read (True)."""
        # No timeout on the wait: the server's ticker (check_deadlines) pings and closes, so
        # a wait costs no timer.
        recv = self.sock.recv
        recv_nowait = None if self._nonblocking is None else self._nonblocking.recv
        while self.close_reason is None:
            try:
                # recv sizes its result to what arrived: no read buffer is held between
                # reads (a pooled 64 KiB buffer would cost more than the whole connection).
                if recv_nowait is None:
                    data = recv(RECV_BYTES)
                else:
                    try:
                        data = recv_nowait(RECV_BYTES)
                    except BlockingIOError:
                        self._park()
                        return True
            except OSError as exc:
                reset = exc.errno in (errno.ECONNRESET, errno.EPIPE)
                self.close_reason = self.close_reason or (CloseReason.PEER_RESET if reset else CloseReason.IO_ERROR)
                return False
            if not data:
                self.close_reason = self.close_reason or CloseReason.PEER_CLOSED
                return False
            metrics.bytes_in.inc(len(data))
            self.last_recv = time.monotonic()
            self.pings_unanswered = 0
            self.decoder.receive_data(data)
            self._process_input()
        return False

    def _park(self) -> None:
        """Give the greenlet back; the read watcher starts a new one when the socket is readable."""
        self._served = 0
        watcher = self._parking
        if watcher is None:
            watcher = self._parking = gevent.get_hub().loop.io(self.sock.fileno(), 1)
        watcher.start(self._unpark)

    def _unpark(self) -> None:
        """The read watcher's callback, in the hub: bytes, EOF or a shutdown arrived."""
        self._parking.stop()
        self.spawn(self.run)

    def _next_deadline(self) -> float:
        cfg = self.config
        if self.state in (State.HANDSHAKE, State.GREETING):
            return self.opened + cfg.handshake_timeout if cfg.handshake_timeout > 0 else INFINITY
        if self.codec is Codec.TEXT or self.state is State.DRAINING:
            return INFINITY  # section 4: text users get no pings and no idle timeout
        deadline = INFINITY
        if cfg.heartbeat > 0:
            deadline = self.last_recv + self.heartbeat.interval * (self.pings_unanswered + 1)
        if cfg.idle_timeout > 0:
            deadline = min(deadline, self.last_recv + self.heartbeat.idle_timeout)
        return deadline

    def check_deadlines(self, now: float) -> None:
        """The server's ticker calls this (Go: a time.Ticker plus SetReadDeadline): ping or time out.

        The write deadline comes first: a blocked writer that made no progress for
        ``idle_timeout`` is a slow consumer, whatever the client sends meanwhile, and a
        connection already closing does not wait longer than that for its last bytes.
        """
        if self._writer is not None and self._write_stalled(now):
            if self.close_reason is None:
                self._overflow()
            else:  # closing, and what it still owes cannot go out: end the wait for it
                self._abort_socket()
            return
        if self.close_reason is not None or now < self._next_deadline():
            return
        cfg = self.config
        if self.state is State.HANDSHAKE:  # no codec yet: closed silently (section 1)
            self.close_reason = CloseReason.HANDSHAKE_TIMEOUT
            self._abort_socket()
        elif self.state is State.GREETING:
            self.fail(ProtocolError("handshake_timeout"))
        elif cfg.idle_timeout > 0 and now >= self.last_recv + self.heartbeat.idle_timeout:
            self.fail(ProtocolError("idle_timeout", f"nothing received for {self.heartbeat.idle_timeout:g} s"))
        else:
            self.pings_unanswered += 1
            ts = now_ms()
            self.pings_sent = self.pings_sent[-(PINGS_REMEMBERED - 1):] + [ts]
            self.send({"type": "ping", "ts": ts})

    def _write_stalled(self, now: float) -> bool:
        return self.config.idle_timeout > 0 and now >= self._progress + self.heartbeat.idle_timeout

    def _process_input(self) -> None:
        decoder = self.decoder
        while self.close_reason is None:
            self._served += 1
            if self._served > FAIR_SHARE:
                self._served = 0
                gevent.sleep(0)  # everyone else's turn (and the flusher's), then on with this input
            if self.owed > self.config.max_outbound_bytes:
                self._await_output_room()
                continue
            try:
                event = decoder.next_event()
            except ProtocolError as exc:
                self._codec_known()
                if exc.closes or not self._rate_limited(None):  # garbage costs a token too
                    self.fail(exc)
                continue
            self._codec_known()
            if event is NEED_DATA:
                return
            try:
                self._on_event(event)
            except ProtocolError as exc:
                self.fail(exc)

    def _await_output_room(self) -> None:
        """Backpressure: the next request waits until the backlog is written (module docstring).

        First what is ready goes to the kernel. If the cap is still passed, the wait ends
        when the writer exits: its backlog written, or the connection closed (slow consumer,
        write deadline, or ``_wake_reader``, which then shuts the write side too). With no
        writer, the rest sits behind a feed of this turn and waits for the turn's flush.
        """
        if self._writer is None:
            self._write(self.outbox.take_ready())
        if self.owed <= self.config.max_outbound_bytes:
            return
        if self._writer is not None:
            self._writer.join()
        else:
            gevent.sleep(0)

    def _codec_known(self) -> None:
        if self.state is State.HANDSHAKE and self.decoder.codec is not None:
            self.codec = self.outbox.codec = self.decoder.codec
            self._move(State.GREETING)

    def _on_event(self, event: dict | str) -> None:
        """Take the request's token (section 6), then serve it."""
        if isinstance(event, str):  # text mode: every line takes a token
            if not self._rate_limited(None):
                self._on_request(self._text_request(event))
            return
        kind = event.get("type")
        if kind not in RATE_EXEMPT:
            rid = event.get("id")
            valid_id = isinstance(rid, (str, int)) and not isinstance(rid, bool) and len(str(rid)) <= 64
            if self._rate_limited(rid if valid_id else None):
                return
        self._on_request(event)

    def _text_request(self, line: str) -> dict:
        request = parse_text_line(line, greeted=self.session is not None, jwt=self.config.auth == "jwt")
        if request.get("room", "") is None:
            room = self.session.current_room if self.session else None
            if room is None:
                raise ProtocolError("not_in_room", "join a room first: /join ROOM")
            request["room"] = room
        return request

    def _rate_limited(self, request_id: Any) -> bool:
        """Take a token; when none is left, answer rate_limited (and close after max_strikes)."""
        if self.bucket.take():
            return False
        self._refuse(ProtocolError("rate_limited", None, request_id))
        return True

    def _refuse(self, error: ProtocolError) -> None:
        """Answer a limited request with ``error``, or close once the strikes reach max_strikes."""
        if self.bucket.struck_out:
            self.fail(ProtocolError("rate_limited", f"closed after {self.bucket.strikes} limited requests in a row",
                                    error.request_id), CloseReason.RATE_LIMITED)
        else:
            self.fail(error)

    # ------------------------------------------------------------ requests

    def _on_request(self, obj: dict) -> None:
        if FAULT_INJECTION and obj.get("type") == "test_fault":
            raise RuntimeError("fault injected by test_fault")
        request = parse_request(obj, self.config.max_text_chars)
        metrics.messages_in.inc(obj["type"])
        if self.state is State.DRAINING:
            if isinstance(request, Bye):
                self.close_reason = CloseReason.BYE
            elif not isinstance(request, Pong):
                raise ProtocolError("shutting_down", "the server is shutting down; reconnect later", request.id)
            return
        if self.session is None:
            if not isinstance(request, Hello):
                raise ProtocolError("hello_required", None, request.id)
            self._hello(request)
            return
        try:
            self._HANDLERS[type(request)](self, request)
        except ProtocolError as exc:
            if exc.request_id is None:
                exc.request_id = request.id
            raise
        except BrokerUnavailable:
            raise ProtocolError("unavailable", None, request.id) from None

    def _hello(self, request: Hello) -> None:
        try:
            session = self.hub.hello(request.nick, request.token, request.resume, self,
                                     resumable=self.codec is not Codec.TEXT)
        except ProtocolError as exc:
            exc.request_id = request.id
            raise
        except BrokerUnavailable:
            raise ProtocolError("unavailable", None, request.id) from None
        self.session = session
        self._move(State.SESSION)
        heartbeat = self.config.heartbeat
        self.reply(request.id, {"type": "welcome", "v": 1, "session": session.id, "nick": session.nick,
                                "heartbeat": int(heartbeat) if heartbeat.is_integer() else heartbeat,
                                "server": server_name()})
        if self.codec is Codec.TEXT:
            self._join(Join(None, TEXT_LOBBY, None))

    def _second_hello(self, request: Hello) -> None:
        raise ProtocolError("bad_request", "this connection already has a session", request.id)

    def _join(self, request: Join) -> None:
        joined, replay = self.hub.join(self.session, request.room, request.since)
        # The replay follows joined, so joined says whether it was cut: the client then asks
        # history from the last seq the replay gave it (docs/protocol.md, history budget).
        replay = self._within_history_budget(joined, replay)
        if request.id is not None:
            joined["id"] = request.id
        self.send_batch([encode(joined, self.codec)] + [out.encoded(self.codec) for out in replay])

    def _leave(self, request: Leave) -> None:
        self.hub.leave(self.session, request.room)
        self.reply(request.id, {"type": "left", "room": request.room})

    def _msg(self, request: Msg) -> None:
        started = time.perf_counter()
        self.reply(request.id, self.hub.post(self.session, request.room, request.text, request.id))
        metrics.fanout_latency.observe(time.perf_counter() - started)

    def _dm(self, request: Dm) -> None:
        try:
            ack = self.hub.dm(self.session, request.to, request.text, request.id)
        except RecipientRateLimited as exc:  # the recipient's limit: a strike, as for this connection's own
            exc.request_id = request.id
            self.bucket.strike()
            self._refuse(exc)
            return
        self.reply(request.id, ack)

    def _who(self, request: Who) -> None:
        self.reply(request.id, {"type": "who", "room": request.room, "members": self.hub.who(request.room)})

    def _rooms(self, request: Rooms) -> None:
        self.reply(request.id, {"type": "rooms", "rooms": self.hub.rooms()})

    def _history(self, request: History) -> None:
        epoch, outs = self.hub.history(request.room, request.since, request.limit)
        reply: dict[str, Any] = {"type": "history", "room": request.room, "epoch": epoch}
        outs = self._within_history_budget(reply, outs)
        if request.id is not None:
            reply["id"] = request.id
        self._enqueue(encode_history(reply, outs, self.codec))

    def _within_history_budget(self, reply: dict, outs: list[Outgoing]) -> list[Outgoing]:
        """The leading ``outs`` within ``max_history_bytes``; a cut sets ``more`` on ``reply``."""
        outs, more = within_budget(outs, self.codec, self.config.max_history_bytes)
        if more:
            reply["more"] = True
            metrics.history_cut.inc()
        return outs

    def _ping(self, request: Ping) -> None:
        reply: dict[str, Any] = {"type": "pong"}
        if request.ts is not None:
            reply["ts"] = request.ts
        self.reply(request.id, reply)

    def _pong(self, request: Pong) -> None:
        if request.ts in self.pings_sent:
            self.pings_sent.remove(request.ts)
            rtt = max(0, now_ms() - request.ts) / 1000
            metrics.heartbeat_rtt.observe(rtt)
            self.heartbeat.observe(rtt)

    def _bye(self, request: Bye) -> None:
        self.close_reason = CloseReason.BYE

    _HANDLERS: dict[type, Callable[["Connection", Any], None]] = {
        Hello: _second_hello, Join: _join, Leave: _leave, Msg: _msg, Dm: _dm, Who: _who,
        Rooms: _rooms, History: _history, Ping: _ping, Pong: _pong, Bye: _bye,
    }

    # ------------------------------------------------------------ output (never blocks)

    @property
    def owed(self) -> int:
        """Bytes given to this connection that the kernel has not taken (the module docstring's rule)."""
        return self.outbox.size + self._unsent

    def reply(self, request_id: Any, message: dict) -> None:
        if request_id is not None and message.get("type") != "ack":
            message["id"] = request_id
        self.send(message)

    def send(self, message: dict) -> None:
        self._enqueue(encode(message, self.codec))

    def send_batch(self, chunks: list[bytes]) -> None:
        """Several messages as one unit (a joined and its replay): they count as one message."""
        self._enqueue(b"".join(chunks))

    def deliver(self, out: Outgoing) -> None:
        """Called by the hub for a message to this connection alone: buffer it, never wait."""
        self._enqueue(out.encoded(self.codec))

    def follow(self, feed: RoomFeed) -> None:
        """Called by the hub: this connection gets the room feed's messages from now on."""
        if self.state is not State.CLOSED and self.close_reason is not CloseReason.SLOW_CONSUMER:
            self.outbox.follow(feed)
            self._schedule()

    def unfollow(self, feed: RoomFeed) -> None:
        self.outbox.unfollow(feed)

    def fail(self, error: ProtocolError, reason: CloseReason | None = None) -> None:
        """Send an error; for closing codes, end the connection once it is written."""
        metrics.errors_sent.inc(error.code)
        if self.codec is not None:
            self.send(error.to_message())
        if error.closes or reason is not None:
            self.close_reason = self.close_reason or reason or ERROR_CLOSE_REASONS[error.code]
            if gevent.getcurrent() is not self._greenlet:
                self._wake_reader()  # the ticker or another connection's greenlet noticed

    def _enqueue(self, data: bytes) -> None:
        """Queue ``data`` unless what is already owed passed the cap: then this is a slow consumer.

        A reply gets here owing at most the cap (the reader waited: ``_await_output_room``);
        what others send does not wait. Before judging, what is ready goes to the kernel (if
        no writer holds the socket), so a client that reads is not cut off for what one turn
        queued for it and the kernel takes at once.
        """
        if not data or self.state is State.CLOSED or self.close_reason is CloseReason.SLOW_CONSUMER:
            return
        cap = self.config.max_outbound_bytes
        if self.owed > cap:
            if self._writer is None:
                self._write(self.outbox.take_ready())
            if self.owed > cap:
                self._overflow()
                return
        self.outbox.add(data)
        self._schedule()

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.flusher.schedule(self)

    def _overflow(self) -> None:
        """Slow consumer: drop the backlog and close (nats queueOutbound, gorilla's default case).

        It only happens while the kernel's buffer is full, in the middle of a write, so the
        slow_consumer error cannot be appended without corrupting that write: it is counted
        and logged as the close reason instead.
        """
        self.close_reason = CloseReason.SLOW_CONSUMER
        metrics.errors_sent.inc("slow_consumer")
        self.outbox.clear()
        self._abort_socket()

    def flush(self) -> None:
        """Write what is pending without blocking; the Flusher calls this once per loop turn.

        While a writer greenlet owns the socket it writes everything, in order; here the
        turn's broadcasts only become bytes (their feeds are sealed now) and are counted.
        """
        self._flush_scheduled = False
        if self.state is State.CLOSED or not self.outbox:
            return
        if self._writer is not None:
            self.outbox.materialize()
            if self.owed > self.config.max_outbound_bytes:
                self._overflow()
            return
        self._write(self.outbox.take())

    def _write(self, data: bytes) -> None:
        """Give ``data`` to the kernel without blocking; a writer greenlet takes what it refuses."""
        if not data:
            return
        sent = 0
        if self._nonblocking is not None:
            try:
                sent = self._nonblocking.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close_reason = self.close_reason or CloseReason.IO_ERROR
                self._abort_socket()
                return
        metrics.bytes_out.inc(sent)
        if sent < len(data):
            self._unsent = len(data) - sent
            self._progress = time.monotonic()
            self._writer = gevent.spawn(self._write_backlog, memoryview(data)[sent:])

    def _write_backlog(self, data: memoryview) -> None:
        """The writer greenlet: exists only while the kernel buffer is full, then exits.

        ``send``, not ``sendall``: each step of progress is counted (``owed``) and timed
        (the write deadline). Open cursors are left for the turn's flush (Outbox.take_ready).
        """
        send = self.sock.send
        try:
            while data:
                sent = send(data)
                data = data[sent:]
                self._unsent -= sent
                self._progress = time.monotonic()
                metrics.bytes_out.inc(sent)
                if not data:
                    ready = self.outbox.take_ready()
                    self._unsent = len(ready)
                    data = memoryview(ready)
        except OSError:
            self.outbox.clear()
            self.close_reason = self.close_reason or CloseReason.IO_ERROR
            self._abort_socket()
        finally:
            self._writer = None
            self._unsent = 0

    def _abort_socket(self) -> None:
        """Wake the reader at once: gevent cancels its wait when the socket is shut down."""
        self._shutdown(socket.SHUT_RDWR)

    def _shutdown(self, how: int) -> None:
        """Shut the socket down the way gevent's plain socket does, TLS or not.

        gevent's SSLSocket.shutdown also drops the TLS session, after which it sends what is
        still owed (an idle_timeout error, a drain's last messages) in clear text, garbage
        to a TLS client; the plain socket's shutdown wakes waiting greenlets just the same.
        """
        try:
            gsocket.socket.shutdown(self.sock, how)
        except OSError:
            pass

    # ------------------------------------------------------------ ending

    def takeover(self) -> None:
        """A resume on another connection took this session: close without touching it."""
        self.session = None
        self.close_reason = self.close_reason or CloseReason.TAKEOVER
        self._wake_reader()

    def begin_drain(self, reconnect_after_ms: int) -> None:
        """Server shutdown: say so, stop taking requests, keep flushing (section 6)."""
        if self.state in (State.HANDSHAKE, State.CLOSED):
            self.close_reason = self.close_reason or CloseReason.SHUTDOWN
            self._abort_socket()
            return
        if self.state is not State.DRAINING:
            self._move(State.DRAINING)
            self.send({"type": "shutdown", "reason": "server shutting down", "reconnect_after": reconnect_after_ms})

    @property
    def parked(self) -> bool:
        """Waiting for input with no greenlet (see the module docstring)."""
        return self._parking is not None and self._parking.active

    @property
    def flushed(self) -> bool:
        return not self.outbox and self._writer is None

    def end_drain(self) -> None:
        self.close_reason = self.close_reason or CloseReason.SHUTDOWN
        self._wake_reader()

    def _wake_reader(self) -> None:
        """Shut the read side: a reader in ``recv``, or a parked connection, wakes at once.

        A reader waiting for its writer (backpressure, only while the cap is passed) wakes
        when the writer fails, so then the write side is shut too: a connection that ends
        owing more than the cap is not flushed, as a slow consumer is not.
        """
        how = socket.SHUT_RDWR if self.owed > self.config.max_outbound_bytes else socket.SHUT_RD
        self._shutdown(how)

    def _finish(self) -> None:
        """Hand the session back to the hub, write what is owed, then shut the socket down.

        Whatever fails on the way (or kills this greenlet), the socket is closed and the
        server forgets the connection: nothing else would ever close it.
        """
        reason = self.close_reason or CloseReason.PEER_CLOSED
        session, self.session = self.session, None
        try:
            if session is not None:
                try:
                    if reason is CloseReason.BYE:
                        self.hub.end(session)
                    else:
                        self.hub.detach(session, self)
                except BrokerUnavailable:
                    log.warning("broker unavailable while closing %s's connection; its claims expire on their own",
                                session.nick)
            if reason not in NO_FLUSH_REASONS:
                self._flush_before_close()
            if self._writer is not None:
                self._writer.kill(block=True)
            self.outbox.clear()
            self.state = State.CLOSED
            if reason in ERROR_CLOSE_REASONS.values():
                self._linger()
            elif reason is CloseReason.SHUTDOWN:
                self._abort_socket()  # section 6: SHUT_RDWR, then close
        finally:
            self.state = State.CLOSED
            if self._parking is not None:
                self._parking.close()
            self.sock.close()
            self.on_closed(self)
        metrics.connections_closed.inc(reason.value)
        if reason is not CloseReason.TLS_HANDSHAKE_FAILED:  # that one said its one line, at debug level
            log.info("close %s:%s nick=%s reason=%s duration=%.1fs", self.address[0], self.address[1],
                     session.nick if session else "-", reason.value, time.monotonic() - self.opened)

    def _linger(self) -> None:
        """Send FIN, then read and drop what the client is still sending, briefly.

        Closing a socket with unread input makes the kernel answer with RST, and an RST can
        destroy the error message the client has not read yet (too_large, auth_failed...).
        """
        try:
            self.sock.shutdown(socket.SHUT_WR)
            with gevent.Timeout(LINGER_TIMEOUT, False):
                drained = 0
                while drained < LINGER_MAX_BYTES:
                    chunk = self.sock.recv(RECV_BYTES)
                    if not chunk:
                        break
                    drained += len(chunk)
        except OSError:
            pass

    def _flush_before_close(self) -> None:
        if self.flushed:  # the usual case: no timer for nothing to write
            return
        with gevent.Timeout(CLOSE_FLUSH_TIMEOUT, False):
            if self._writer is not None:
                self._writer.join()
            if self.outbox:
                data = self.outbox.take()
                try:
                    self.sock.sendall(data)
                    metrics.bytes_out.inc(len(data))
                except OSError:
                    pass


def handshake_failure(exc: OSError) -> str:
    """Why a TLS handshake failed, in a few words: OpenSSL's reason (``WRONG_VERSION_NUMBER``
    for a plain-text client, ``UNSUPPORTED_PROTOCOL`` for TLS 1.1) or what the peer did."""
    if isinstance(exc, ssl.SSLEOFError):
        return "closed by the client"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.args[-1])
    if exc.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):
        return "reset by the client"
    return exc.strerror or type(exc).__name__


def server_name() -> str:
    from gochat import __version__

    return f"gochat/{__version__}"
