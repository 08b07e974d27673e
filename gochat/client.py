"""The gochat client library, on gevent: used by the tests, ``gochat connect`` and locust.

One reader greenlet per client decodes what the server sends (with the same sans-IO codec
as the server) and routes it: a reply to the request that carries its id wakes that
request's caller; everything else (room messages, DMs, presence, shutdown) goes to the
inbox, which ``recv`` and iteration read. Server pings are answered by the reader itself.
"""
from __future__ import annotations

import itertools
import random
import secrets
import socket
import ssl
from typing import Any, Iterator

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import AsyncResult
from gevent.lock import Semaphore
from gevent.queue import Queue

from gochat.protocol import (
    DEFAULT_HISTORY_LIMIT,
    FRAME_MAGIC,
    NEED_DATA,
    Codec,
    Decoder,
    encode_frame,
    encode_json,
)

REPLY_TYPES = frozenset({"welcome", "ack", "joined", "left", "who", "rooms", "history", "pong", "error"})
CLOSED = object()  # inbox sentinel: the connection ended
DEFAULT_TIMEOUT = 10.0
MAX_REPLY_BYTES = 64 * 1024 * 1024  # server messages may exceed max_frame_bytes (a big history)


def wrap_tls(sock: gsocket.socket, tls: bool | ssl.SSLContext, host: str) -> gssl.SSLSocket:
    """TLS over a gevent socket, handshake included, without blocking the loop.

    A standard-library context would do a blocking handshake on gevent's socket (in a
    monkey-patched process ``ssl.SSLContext`` already is gevent's), so a given context is
    used through gevent's SSLSocket, which takes any context.
    """
    context = gssl.create_default_context() if tls is True else tls
    return gssl.SSLSocket(sock=sock, server_hostname=host, _context=context)


# How a client should take each error code (the source article's split): retry after a
# pause, or give up and tell the caller. Codes in neither set are request-level answers.
RETRYABLE_CODES = frozenset({"unavailable", "shutting_down", "idle_timeout", "rate_limited", "slow_consumer",
                             "too_many_connections", "handshake_timeout"})
FATAL_CODES = frozenset({"auth_failed", "bad_nick", "unsupported_version", "nick_taken"})


class ChatError(Exception):
    """An ``error`` the server answered a request with."""

    def __init__(self, reply: dict) -> None:
        self.reply = reply
        self.code = reply.get("code", "")
        self.message = reply.get("message", "")
        super().__init__(f"{self.code}: {self.message}")

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES


class FatalChatError(ChatError):
    """An error that retrying cannot fix (bad credentials, a nick in use, a protocol mismatch)."""


class ConnectionClosed(ConnectionError):
    """The server closed the connection (or it broke) before the awaited reply came."""


class Client:
    def __init__(self, host: str, port: int, codec: str = "json", tls: bool | ssl.SSLContext = False,
                 timeout: float = DEFAULT_TIMEOUT, source: str | None = None) -> None:
        self.codec = Codec(codec)
        if self.codec is Codec.TEXT:
            raise ValueError("the client library speaks json or frames; text mode is for humans")
        self.timeout = timeout
        sock = gsocket.create_connection((host, port), timeout=timeout,
                                         source_address=(source, 0) if source else None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            sock = wrap_tls(sock, tls, host)
        sock.settimeout(None)
        self.sock = sock
        self.session: str | None = None
        self.nick: str | None = None
        self.welcome: dict | None = None
        self.inbox: Queue = Queue()
        self.closed = False
        self._ids = itertools.count(1)
        self._waiting: dict[Any, AsyncResult] = {}
        self._epoch_checks: dict[Any, tuple[str, str]] = {}  # join id -> (room, the epoch its since counts in)
        self._stale: dict[str, Any] = {}  # room -> id of the re-join whose replay supersedes its msgs until then
        self._write_lock = Semaphore()  # one writer at a time: sendall may yield mid-message
        self._encode = encode_frame if self.codec is Codec.FRAMES else encode_json
        if self.codec is Codec.FRAMES:
            self._write(FRAME_MAGIC)
        self._reader = gevent.spawn(self._read_loop)

    # ------------------------------------------------------------ plumbing

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from exc

    def send_nowait(self, message: dict) -> None:
        """Send without waiting for a reply (load generators, pongs)."""
        self._write(self._encode(message))

    def request(self, message: dict, timeout: float | None = None) -> dict:
        """Send with a fresh id unless one is given, and wait for the reply that echoes it."""
        if "id" not in message:
            message = {**message, "id": next(self._ids)}
        waiter = self._waiting[message["id"]] = AsyncResult()
        try:
            self.send_nowait(message)
            reply = waiter.get(timeout=self.timeout if timeout is None else timeout)
        except gevent.Timeout:
            raise TimeoutError(f"no reply to {message.get('type')} {message['id']!r}") from None
        finally:
            self._waiting.pop(message["id"], None)
        if reply is CLOSED:
            raise ConnectionClosed(f"connection closed before the reply to {message.get('type')}")
        if reply.get("type") == "error":
            raise ChatError(reply)
        return reply

    def _read_loop(self) -> None:
        decoder = Decoder(MAX_REPLY_BYTES, codec=self.codec)  # server frames come without the magic
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                decoder.receive_data(data)
                while (message := decoder.next_event()) is not NEED_DATA:
                    self._route(message)
        except Exception as exc:  # the reader dies with the connection, whatever broke it
            if not self.closed:
                self.inbox.put({"type": "closed", "reason": repr(exc)})
        finally:
            self.closed = True
            for waiter in list(self._waiting.values()):
                if not waiter.ready():  # a reply that came just before the close still counts
                    waiter.set(CLOSED)
            self.inbox.put(CLOSED)

    def _route(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "ping":
            self.send_nowait({"type": "pong", "ts": message.get("ts")})
            return
        if kind == "msg" and message.get("room") in self._stale:
            return  # the re-join's replay brings it again, in seq order (see join)
        if kind == "joined":
            self._check_epoch(message)
        waiter = self._waiting.get(message.get("id")) if kind in REPLY_TYPES else None
        if waiter is not None:
            waiter.set(message)
        else:
            self.inbox.put(message)

    def _check_epoch(self, reply: dict) -> None:
        """Runs in the reader, so msgs are dropped from exactly the joined reply on (see join)."""
        rid, room = reply.get("id"), reply.get("room")
        if rid is not None and room in self._stale and self._stale[room] == rid:
            del self._stale[room]  # the re-join's reply: its replay and live msgs follow
        check = self._epoch_checks.pop(rid, None)
        if check is not None and reply.get("epoch") != check[1] and reply.get("seq"):
            self._stale[check[0]] = None

    # ------------------------------------------------------------ the protocol

    def hello(self, nick: str | None = None, token: str | None = None, resume: str | None = None) -> dict:
        message: dict[str, Any] = {"type": "hello", "v": 1}
        for key, value in (("nick", nick), ("token", token), ("resume", resume)):
            if value is not None:
                message[key] = value
        self.welcome = self.request(message)
        self.session, self.nick = self.welcome["session"], self.welcome["nick"]
        return self.welcome

    def join(self, room: str, since: int | None = None, epoch: str | None = None) -> dict:
        """The ``joined`` reply (its ``epoch`` names the sequence its seqs count in); replayed
        messages arrive in the inbox after it.

        Give ``epoch`` with ``since`` when the since was saved from an earlier connection:
        the epoch of the ``joined`` it counts from. If the room's sequence restarted since then
        (another epoch), ``since`` is void (PROTOCOL.md section 3): every msg of the new epoch
        is one the client missed, so it re-joins with ``since`` 0 and gets the room's whole
        retained history. The reader drops the room's msgs between the two ``joined`` replies
        (the stale replay, and live msgs the second replay repeats in order), so nothing
        arrives twice or out of order; the second ``joined`` is returned. A new epoch with
        seq 0 has nothing to replay and needs no second join.
        """
        message: dict[str, Any] = {"type": "join", "room": room, "id": next(self._ids)}
        if since is not None:
            message["since"] = since
        if not since or epoch is None:
            return self.request(message)  # since 0 replays the whole retained history in any epoch
        self._epoch_checks[message["id"]] = (room, epoch)
        try:
            joined = self.request(message)
        finally:
            self._epoch_checks.pop(message["id"], None)
        if room not in self._stale:
            return joined
        rejoin = {"type": "join", "room": room, "since": 0, "id": next(self._ids)}
        self._stale[room] = rejoin["id"]
        try:
            return self.request(rejoin)
        finally:
            self._stale.pop(room, None)

    def leave(self, room: str) -> dict:
        return self.request({"type": "leave", "room": room})

    def send(self, room: str, text: str, id: Any = None) -> dict:
        """Post to a room and wait for the ack: once it returns, the message holds its seq."""
        message: dict[str, Any] = {"type": "msg", "room": room, "text": text}
        if id is not None:
            message["id"] = id
        return self.request(message)

    def dm(self, to: str, text: str, id: Any = None) -> dict:
        message: dict[str, Any] = {"type": "dm", "to": to, "text": text}
        if id is not None:
            message["id"] = id
        return self.request(message)

    def who(self, room: str) -> list[str]:
        return self.request({"type": "who", "room": room})["members"]

    def rooms(self) -> list[dict]:
        return self.request({"type": "rooms"})["rooms"]

    def history(self, room: str, since: int = 0, limit: int | None = None, pages: bool = True) -> list[dict]:
        """The first ``limit`` retained msgs after ``since`` (the server's default: 100).

        A reply cut by the server's byte budget says ``more``; with ``pages`` this asks again
        from the last seq it got until it has ``limit`` msgs or the room has no more. A page
        of another epoch ends the paging: its seqs do not continue the earlier ones.
        """
        wanted = DEFAULT_HISTORY_LIMIT if limit is None else limit
        messages: list[dict] = []
        epoch = None
        while True:
            reply = self.request({"type": "history", "room": room, "since": since, "limit": wanted - len(messages)})
            if epoch is not None and reply.get("epoch") != epoch:
                return messages
            epoch = reply.get("epoch")
            messages += reply["messages"]
            if not (pages and reply.get("more") and reply["messages"] and len(messages) < wanted):
                return messages
            since = reply["messages"][-1]["seq"]

    def ping(self, ts: Any = 0) -> dict:
        return self.request({"type": "ping", "ts": ts})

    def recv(self, timeout: float | None = None) -> dict | None:
        """The next pushed message; None once the connection has ended."""
        try:
            message = self.inbox.get(timeout=self.timeout if timeout is None else timeout)
        except gevent.queue.Empty:
            raise TimeoutError("nothing received") from None
        if message is CLOSED:
            self.inbox.put(CLOSED)  # later calls see the end too
            return None
        return message

    def expect(self, type_: str, timeout: float | None = None, **fields: Any) -> dict:
        """The next pushed message of a type (and field values); others before it are dropped."""
        with gevent.Timeout(self.timeout if timeout is None else timeout, TimeoutError(f"no {type_} {fields}")):
            while True:
                message = self.recv(timeout=None)
                if message is None:
                    raise ConnectionClosed(f"closed while waiting for {type_}")
                if message.get("type") == type_ and all(message.get(k) == v for k, v in fields.items()):
                    return message

    def __iter__(self) -> Iterator[dict]:
        while (message := self.inbox.get()) is not CLOSED:
            yield message
        self.inbox.put(CLOSED)

    def bye(self) -> None:
        """Leave for good: the server sends offline presence and frees the nick at once."""
        try:
            self.send_nowait({"type": "bye"})
        except ConnectionClosed:
            pass
        self._reader.join(timeout=self.timeout)
        self.close()

    def close(self) -> None:
        """Drop the connection without bye: the session stays resumable for resume_window."""
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        self._reader.join(timeout=self.timeout)
        if not self._reader.dead:
            self._reader.kill()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backoff:
    """Jittered exponential backoff ("full jitter"): a random pause up to base * 2^attempt, capped."""

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0

    def pause(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * 2 ** self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class ReconnectingClient:
    """A client that survives restarts, drains and failovers: it reconnects and resumes on its own.

    It tries ``addresses`` in turn with jittered exponential backoff, resumes its session
    (same nick, same rooms) and re-joins every room with ``since`` = the last seq it saw,
    so it gets exactly the messages it missed. That seq counts in the room's epoch as it
    saw it: a room whose sequence restarted meanwhile (forgotten by the server, expired)
    gets a void since, and the re-join replays the new epoch from its start
    (:meth:`Client.join`); ``epochs`` holds each room's epoch, ``restarted`` the rooms
    whose epoch changed on the last reconnect. ``send`` gives every message an id and
    retries it until acked, so a retry is never posted twice. Retryable failures (network
    errors, ``unavailable``, ``shutting_down``, ``idle_timeout``, ``rate_limited`` after a
    pause) are retried; fatal ones raise :class:`FatalChatError` from the server's error.
    """

    def __init__(self, addresses: list[tuple[str, int]], nick: str | None = None, token: str | None = None,
                 codec: str = "json", tls: bool | ssl.SSLContext = False, timeout: float = DEFAULT_TIMEOUT,
                 backoff: Backoff | None = None, max_attempts: int = 50) -> None:
        self.addresses = list(addresses)
        self.nick, self.token, self.codec, self.tls, self.timeout = nick, token, codec, tls, timeout
        self.backoff = backoff or Backoff()
        self.max_attempts = max_attempts
        self.session: str | None = None
        self.rooms: dict[str, int | None] = {}  # room -> last seq seen
        self.epochs: dict[str, str | None] = {}  # room -> the epoch those seqs count in
        self.restarted: list[str] = []
        self.reconnects = -1
        self.client: Client | None = None
        self._next_address = 0
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)
        self._reconnect_after = 0.0
        self.connect()

    def connect(self) -> None:
        """(Re)connect until a session is up; raises FatalChatError, or ConnectionClosed after max_attempts."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._reconnect_after:
            gevent.sleep(self._reconnect_after)  # the server's lame-duck advice
            self._reconnect_after = 0.0
        last_error: Exception | None = None
        for _ in range(self.max_attempts):
            host, port = self.addresses[self._next_address % len(self.addresses)]
            self._next_address += 1
            try:
                self.client = self._open(host, port)
                self.backoff.reset()
                self.reconnects += 1
                return
            except ChatError as exc:
                if exc.code in FATAL_CODES:
                    raise FatalChatError(exc.reply) from exc
                last_error = exc
            except (OSError, TimeoutError) as exc:
                last_error = exc
            gevent.sleep(self.backoff.pause())
        raise ConnectionClosed(f"gave up after {self.max_attempts} attempts: {last_error}") from last_error

    def _open(self, host: str, port: int) -> Client:
        client = Client(host, port, codec=self.codec, tls=self.tls, timeout=self.timeout)
        try:
            welcome = None
            if self.session:
                try:
                    welcome = client.hello(resume=self.session)
                except ChatError as exc:
                    if exc.code != "bad_session":
                        raise
            if welcome is None:
                welcome = client.hello(nick=self.nick, token=self.token)
            self.session, self.nick = welcome["session"], welcome["nick"]
            restarted = []
            for room, seen in self.rooms.items():
                saved = self.epochs.get(room)
                epoch = client.join(room, since=seen, epoch=saved).get("epoch")
                if saved is not None and epoch != saved:
                    restarted.append(room)
                    self.rooms[room] = 0  # replayed msgs of the new epoch count up from here
                self.epochs[room] = epoch
            self.restarted = restarted
        except BaseException:
            client.close()
            raise
        return client

    def _retrying(self, call: Any) -> dict:
        while True:
            try:
                return call(self.client)
            except ChatError as exc:
                if exc.code in FATAL_CODES:
                    raise FatalChatError(exc.reply) from exc
                if not exc.retryable:
                    raise
                gevent.sleep(self.backoff.pause())
                if exc.code in ("shutting_down", "idle_timeout", "slow_consumer"):
                    self.connect()
            except (ConnectionClosed, OSError, TimeoutError):
                self.connect()

    def join(self, room: str, since: int | None = None) -> dict:
        joined = self._retrying(lambda c: c.join(room, since))
        self.rooms.setdefault(room, since if since is not None else joined["seq"])
        self.epochs.setdefault(room, joined.get("epoch"))
        return joined

    def send(self, room: str, text: str, id: Any = None) -> dict:
        """Post and wait for the ack, retrying across reconnects with one id: exactly once."""
        rid = id if id is not None else f"{self._id_prefix}-{next(self._ids)}"
        return self._retrying(lambda c: c.send(room, text, id=rid))

    def recv(self, timeout: float | None = None) -> dict:
        """The next pushed message, reconnecting (and replaying what was missed) when the connection ends."""
        while True:
            message = self.client.recv(timeout)
            if message is None or message.get("type") == "closed":
                self.connect()
                continue
            kind = message.get("type")
            if kind == "msg" and message["room"] in self.rooms:
                self.rooms[message["room"]] = max(message["seq"], self.rooms[message["room"]] or 0)
            elif kind == "shutdown":
                self._reconnect_after = message.get("reconnect_after", 0) / 1000
            return message

    def close(self) -> None:
        if self.client is not None:
            self.client.bye()
            self.client = None
