"""The admin HTTP server (PROTOCOL.md section 8): health, readiness, metrics, stats, status page.

It runs on gevent's WSGI server in the same process and stays up during the drain, so
load balancers see /ready turn 503 while clients are being told to leave. ``GET /`` is a
live status page (gochat.status_page) drawn from /stats, /ready and /metrics.

It also exports the gauges that alerting needs as ratios (connections against
``max_connections``, open files against the limit) and the process's memory and start
time, which the private metrics registry would otherwise not have.

Whoever reaches the port may be hostile (a web page in an operator's browser, through DNS
rebinding; a slowloris on a private interface), so :class:`AdminHTTP` bounds what they can
hold, for this server and for the ``--workers`` supervisor's:

- a request must arrive whole within ``REQUEST_TIMEOUT`` of the connection's start or of
  the previous response, else the connection is closed;
- at most ``MAX_CONNECTIONS`` connections at once, a budget of its own beside the chat
  port's descriptors (server.FD_RESERVE counts it). At the cap a new connection closes the
  one that has waited longest for a request (nginx reuses idle connections the same way),
  so a flood of silent or half-sent requests cannot lock out /health; only when every held
  connection is busy with a response is the new one refused, with 503;
- with a loopback admin address, a request whose Host is not a loopback name is answered
  421 Misdirected Request: a page of evil.example whose name was rebound to 127.0.0.1 must
  not read /stats (its requests carry ``Host: evil.example``).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Iterable

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gochat import metrics, status_page

if TYPE_CHECKING:
    from gochat.server import Server

log = logging.getLogger("gochat.admin")

StartResponse = Callable[[str, list[tuple[str, str]]], object]
WsgiApp = Callable[[dict, StartResponse], Iterable[bytes]]

# Connections at once: Prometheus and the probes need one or two each, a status page in a
# browser up to six (its connection pool per host).
MAX_CONNECTIONS = 32
# Seconds for a request to arrive whole. A scraper or a probe sends its request at once;
# 5 s is many round trips even over an SSH tunnel, and what one held connection can cost.
# The status page's browser polls every second, well inside it, so its keep-alive lasts.
REQUEST_TIMEOUT = 5.0
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
MISDIRECTED = "421 Misdirected Request"
_REFUSED_BODY = b'{"error": "too many admin connections"}'
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY))


def loopback_host_names(admin_host: str) -> frozenset[str] | None:
    """The Host names a loopback admin address answers to, or None: no check for other addresses
    (an operator who binds a private interface names it as they like)."""
    name = admin_host.strip("[]").lower()
    if name != "localhost":
        try:
            if not ipaddress.ip_address(name).is_loopback:
                return None
        except ValueError:
            return None
    return LOOPBACK_NAMES | {f"[{name}]" if ":" in name else name}


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Is ``Host`` one of the ``allowed`` names, with any port or none?

    Any port: an operator's SSH tunnel (``ssh -L 8080:127.0.0.1:9001``) makes the browser
    send ``Host: localhost:8080``. No Host at all (HTTP/1.0 tools) is accepted: browsers,
    the only way DNS rebinding reaches the port, always send one.
    """
    if header is None:
        return True
    name = header.strip().lower()
    if name.startswith("["):
        name = name[:name.find("]") + 1]
    else:
        name = name.partition(":")[0]
    return name in allowed


class _Handler(WSGIHandler):
    """pywsgi's handler, with the wait for each request's head under REQUEST_TIMEOUT.

    The timer stops once the head is in: answers are small (tens of KB) and fit the socket
    buffers, so writing one does not wait on the client. (A timer must not run into the
    answer either: pywsgi's handle_one_response catches everything, the timer's exception
    included, and would log it as an application error.)
    """

    served = 0  # requests answered on this connection
    deadline: gevent.Timeout | None = None

    def handle_one_request(self) -> object:
        self.server.waiting[self.socket] = None
        self.deadline = gevent.Timeout.start_new(REQUEST_TIMEOUT)
        try:
            result = super().handle_one_request()
        except gevent.Timeout as exc:
            if exc is not self.deadline:
                raise
            if not self.served:  # a keep-alive connection idle between requests just ends
                metrics.admin_refused.inc("request_timeout")
            return None
        finally:
            self._got_head()
        self.served += 1
        return result

    def read_request(self, raw_requestline: str) -> object:
        result = super().read_request(raw_requestline)
        self._got_head()
        if self.evicted:
            raise ValueError("evicted")  # what arrived before the shutdown is not answered
        if self.content_length or self.headers.get("transfer-encoding"):
            # No admin request takes a body, and pywsgi would read one to its end, timer or not.
            raise ValueError("admin requests carry no body")
        return result

    def _handle_client_error(self, ex: Exception) -> object:
        """pywsgi's hook for a bad request: logged and answered 400, unless this connection
        was evicted, whose peer gets nothing more (an answer would meet a broken pipe)."""
        if self.evicted:
            return None
        return super()._handle_client_error(ex)

    @property
    def evicted(self) -> bool:
        return self.socket not in self.server.held

    def _got_head(self) -> None:
        """Busy answering, no longer waiting: no timer, and not a connection to evict."""
        if self.deadline is not None:
            self.deadline.close()
            self.deadline = None
        self.server.waiting.pop(self.socket, None)


class AdminHTTP(WSGIServer):
    """gevent's WSGI server with a request timeout, a connection cap and the Host check.

    Shared state, one owner: ``held`` (every connection admitted, until its handler ends
    or it is evicted) and ``waiting`` (those waiting for a request, longest first) change
    only in ``handle``, the handler and ``_evict``, all in this process's one thread.
    """

    handler_class = _Handler

    def __init__(self, host: str, port: int, app: WsgiApp) -> None:
        self.handlers = Pool()  # no size: the cap is checked in handle, where refusing is possible
        # SERVER_NAME given: pywsgi would otherwise look the address's name up at start, in a
        # resolver thread of gevent's that lingers, uncounted by Server.greenlets, for 5 s.
        super().__init__((host, port), self._checked, log=None, error_log=log, spawn=self.handlers,
                         environ={"SERVER_NAME": host})
        self.inner_app = app
        self.allowed_hosts = loopback_host_names(host)
        self.held: set[socket.socket] = set()
        self.waiting: OrderedDict[socket.socket, None] = OrderedDict()

    def handle(self, sock: socket.socket, address: tuple) -> None:
        if len(self.held) >= MAX_CONNECTIONS and not self._evict():
            metrics.admin_refused.inc("max_connections")
            try:
                sock.sendall(REFUSED)
            except OSError:
                pass
            return
        self.held.add(sock)
        try:
            super().handle(sock, address)
        finally:
            self.held.discard(sock)
            self.waiting.pop(sock, None)

    def _evict(self) -> bool:
        """Shut down the connection that has waited longest for a request; False if none waits.

        Its handler, blocked reading, reads the end of the stream and closes the socket
        before the loop's next turn (a plain close here would not: the handler's file
        object holds the descriptor open).
        """
        if not self.waiting:
            return False
        sock, _ = self.waiting.popitem(last=False)
        self.held.discard(sock)
        metrics.admin_refused.inc("max_connections")
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    def _checked(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        if self.allowed_hosts is not None and not host_allowed(environ.get("HTTP_HOST"), self.allowed_hosts):
            metrics.admin_refused.inc("bad_host")
            return json_response(start_response, MISDIRECTED,
                                 {"error": "this admin port answers only to a loopback Host "
                                           "(localhost, 127.0.0.1, [::1])"})
        return self.inner_app(environ, start_response)


def json_response(start_response: StartResponse, status: str, body: dict) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


class AdminServer:
    def __init__(self, server: "Server") -> None:
        self.server = server
        config = server.config
        self.http = AdminHTTP(config.admin_host, config.admin_port, self.app)
        _register_gauges(server, self.http)

    @property
    def port(self) -> int:
        return self.http.address[1]

    def greenlets(self) -> int:
        return len(self.http.handlers)

    def start(self) -> None:
        self.http.start()

    def stop(self) -> None:
        self.http.stop(timeout=1)

    def app(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return json_response(start_response, "405 Method Not Allowed", {"error": "GET only"})
        if path in ("/", "/status"):
            return status_page.app(environ, start_response)
        if path == "/health":
            return json_response(start_response, "200 OK", {"ok": True})
        if path == "/ready":
            ready, reason = self.server.ready()
            if ready:
                return json_response(start_response, "200 OK", {"ready": True})
            return json_response(start_response, "503 Service Unavailable", {"ready": False, "reason": reason})
        if path == "/metrics":
            body = generate_latest(metrics.REGISTRY)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/stats":
            walk = "walk=1" in environ.get("QUERY_STRING", "").split("&")
            return json_response(start_response, "200 OK", self.server.stats(walk=walk))
        return json_response(start_response, "404 Not Found", {"error": f"no such page {path}"})


def _register_gauges(server: "Server", http: AdminHTTP) -> None:
    """Gauges for capacity alerts and dashboards: the caps in force, memory, start time."""
    from gochat.server import rss_bytes

    metrics.gauge("gochat_max_connections", "Connection cap in force (max_connections, bounded by open files)",
                  lambda: server.max_connections)
    metrics.gauge("gochat_open_files_limit", "Soft open-file limit of the process", lambda: server.nofile[0])
    metrics.gauge("gochat_resident_memory_bytes", "Resident memory of the process", rss_bytes)
    metrics.gauge("gochat_start_time_seconds", "Unix time the process started", lambda: server.started)
    metrics.gauge("gochat_admin_connections", "Admin HTTP connections held (at most admin.MAX_CONNECTIONS)",
                  lambda: len(http.held))
