"""Locust load test for gochat, built on the gochat client library (see loadtest/README.md).

    locust -f loadtest/locustfile.py --host 127.0.0.1:9000              # web UI on :8089
    locust -f loadtest/locustfile.py --host 127.0.0.1:9000 --headless -u 100 -r 20 -t 1m

Each simulated user opens one connection, says hello with a unique nick, joins one of
--chat-rooms rooms and posts --chat-rate messages per second to it. Every message text
starts with ``ts=<time.time_ns()>`` so that its receivers can measure delivery latency.

Request names in the statistics (all of request_type "gochat"):

    login         connect + hello + join, as one request
    msg ack       a msg, from send until its ack (the message then holds its seq)
    delivery      a msg pushed to a room member (its sender included): now - the ts in its text
    server error  an error or shutdown the server pushed without a request, or a dropped connection

Delivery latency compares clocks of the sender's and the receiver's machine: run the
workers of a distributed test on machines with synchronised clocks (or on one machine).

Only this directory imports locust: it monkey-patches the whole process.
"""
from __future__ import annotations

import itertools
import time
import uuid
from urllib.parse import urlsplit

import gevent
from locust import User, events, task
from locust.user.wait_time import constant_throughput

from gochat.client import ChatError, Client, ConnectionClosed

DEFAULT_PORT = 9000
REQUEST_TYPE = "gochat"
RUN_ID = uuid.uuid4().hex[:6]  # nicks stay unique across locust processes (workers)
_user_numbers = itertools.count(1)  # spreads users over the rooms
_nick_numbers = itertools.count(1)


@events.init_command_line_parser.add_listener
def _(parser) -> None:
    group = parser.add_argument_group("gochat", "options of the gochat ChatUser")
    group.add_argument("--chat-rooms", type=int, default=5, env_var="LOCUST_CHAT_ROOMS",
                       help="users are spread over this many rooms, lc-room-0 ... (default 5)")
    group.add_argument("--chat-rate", type=float, default=1.0, env_var="LOCUST_CHAT_RATE",
                       help="messages per second sent by each user (default 1; the server's "
                            "per-connection limit is --rate 20 --burst 40 by default)")
    group.add_argument("--chat-text-bytes", type=int, default=64, env_var="LOCUST_CHAT_TEXT_BYTES",
                       help="size of each message text, padded (default 64; the server accepts "
                            "up to max_text_chars, 4096 by default)")
    group.add_argument("--chat-codec", choices=["json", "frames"], default="json", env_var="LOCUST_CHAT_CODEC",
                       help="wire codec: json lines or binary frames (default json)")


def parse_host(host: str | None) -> tuple[str, int]:
    """``tcp://127.0.0.1:9000``, ``127.0.0.1:9000``, ``127.0.0.1`` or ``[::1]:9000``."""
    host = host or f"127.0.0.1:{DEFAULT_PORT}"
    if "://" not in host:
        host = "tcp://" + host
    parts = urlsplit(host)
    if parts.scheme != "tcp" or not parts.hostname:
        raise ValueError(f"bad --host {host!r}: expected tcp://HOST:PORT or HOST:PORT")
    return parts.hostname, parts.port or DEFAULT_PORT


def option(environment, name: str, default):
    """A --chat-* option; the defaults apply when locust runs as a library without a parser."""
    value = getattr(environment.parsed_options, name, None)
    return default if value is None else type(default)(value)  # the web UI may hand back strings


class ChatUser(User):
    client: Client | None = None  # the connection of the current login
    receiver: gevent.Greenlet | None = None  # this user's reader of pushed messages
    stopping = False

    def on_start(self) -> None:
        env = self.environment
        self.rooms = max(1, option(env, "chat_rooms", 5))
        self.rate = option(env, "chat_rate", 1.0)
        self.text_bytes = option(env, "chat_text_bytes", 64)
        self.codec = option(env, "chat_codec", "json")
        if self.rate <= 0:
            raise ValueError("--chat-rate must be above 0")
        self.address = parse_host(self.host)
        self.number = next(_user_numbers)
        self.room = f"lc-room-{self.number % self.rooms}"
        self.login()

    def wait_time(self) -> float:
        return constant_throughput(self.rate)(self)  # pacing state lives on self

    def fire(self, name: str, started: float | None = None, response_time: float = 0.0,
             length: int = 0, exception: BaseException | None = None) -> None:
        if started is not None:
            response_time = (time.perf_counter() - started) * 1000
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE, name=name, response_time=response_time,
            response_length=length, exception=exception, context={})

    def login(self) -> None:
        """Connect, hello with a fresh nick, join: one "login" request. A new nick on every
        login, because the server keeps a dropped session's nick for its resume window."""
        nick = f"lc-{RUN_ID}-{next(_nick_numbers)}"
        started = time.perf_counter()
        client = None
        try:
            client = Client(*self.address, codec=self.codec)
            client.hello(nick=nick)
            client.join(self.room)
        except (OSError, ChatError) as exc:  # ConnectionClosed and TimeoutError are OSErrors
            if client is not None:
                client.close()
            self.fire("login", started, exception=exc)
            return
        self.fire("login", started)
        self.client = client
        self.receiver = gevent.spawn(self.receive, client)

    def receive(self, client: Client) -> None:
        """Everything the server pushes: msgs become "delivery" requests, errors failures."""
        reported = False
        for message in client:
            kind = message.get("type")
            if kind == "msg":
                text = message.get("text", "")
                stamp = text.split(" ", 1)[0]
                if not (stamp.startswith("ts=") and stamp[3:].isdigit()):
                    continue  # not sent by this load test
                self.fire("delivery", response_time=(time.time_ns() - int(stamp[3:])) / 1e6,
                          length=len(text.encode()))
            elif kind == "error":
                self.fire("server error", exception=ChatError(message))
                reported = True
            elif kind == "shutdown":
                self.fire("server error", exception=ConnectionClosed(f"server shutdown: {message.get('reason')}"))
                reported = True
        if not (self.stopping or reported):
            self.fire("server error", exception=ConnectionClosed("the server closed the connection"))
        # the next task logs in again, unless the user is stopping

    @task
    def send_message(self) -> None:
        if self.client is None or self.client.closed:
            self.client = None
            self.login()
            return
        head = f"ts={time.time_ns()} {self.client.nick} "
        text = head + "x" * max(0, self.text_bytes - len(head))
        started = time.perf_counter()
        try:
            self.client.send(self.room, text)
        except (OSError, ChatError) as exc:
            self.fire("msg ack", started, exception=exc)
        else:
            self.fire("msg ack", started, length=len(text.encode()))

    def on_stop(self) -> None:
        self.stopping = True
        if self.client is not None:
            self.client.bye()  # sends bye, waits for the server to close, closes
        if self.receiver is not None:
            self.receiver.join(timeout=5)
            self.receiver.kill()
