"""The admin HTTP server (PROTOCOL.md section 8): health, readiness, metrics, stats, status page.

It runs on gevent's WSGI server in the same process and stays up during the drain, so
load balancers see /ready turn 503 while clients are being told to leave. ``GET /`` is a
live status page (gochat.status_page) drawn from /stats, /ready and /metrics.

It also exports the gauges that alerting needs as ratios (connections against
``max_connections``, open files against the limit) and the process's memory and start
time, which the private metrics registry would otherwise not have.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Callable, Iterable

from gevent.pywsgi import WSGIServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gochat import metrics, status_page

if TYPE_CHECKING:
    from gochat.server import Server

log = logging.getLogger("gochat.admin")

StartResponse = Callable[[str, list[tuple[str, str]]], object]


class AdminServer:
    def __init__(self, server: "Server") -> None:
        self.server = server
        config = server.config
        self.http = WSGIServer((config.admin_host, config.admin_port), self.app, log=None, error_log=log)
        _register_gauges(server)

    @property
    def port(self) -> int:
        return self.http.address[1]

    def start(self) -> None:
        self.http.start()

    def stop(self) -> None:
        self.http.stop(timeout=1)

    def app(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return self._json(start_response, "405 Method Not Allowed", {"error": "GET only"})
        if path in ("/", "/status"):
            return status_page.app(environ, start_response)
        if path == "/health":
            return self._json(start_response, "200 OK", {"ok": True})
        if path == "/ready":
            ready, reason = self.server.ready()
            if ready:
                return self._json(start_response, "200 OK", {"ready": True})
            return self._json(start_response, "503 Service Unavailable", {"ready": False, "reason": reason})
        if path == "/metrics":
            body = generate_latest(metrics.REGISTRY)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/stats":
            return self._json(start_response, "200 OK", self.server.stats())
        return self._json(start_response, "404 Not Found", {"error": f"no such page {path}"})

    @staticmethod
    def _json(start_response: StartResponse, status: str, body: dict) -> list[bytes]:
        data = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


def _register_gauges(server: "Server") -> None:
    """Gauges for capacity alerts and dashboards: the caps in force, memory, start time."""
    from gochat.server import rss_bytes

    metrics.gauge("gochat_max_connections", "Connection cap in force (max_connections, bounded by open files)",
                  lambda: server.max_connections)
    metrics.gauge("gochat_open_files_limit", "Soft open-file limit of the process", lambda: server.nofile[0])
    metrics.gauge("gochat_resident_memory_bytes", "Resident memory of the process", rss_bytes)
    metrics.gauge("gochat_start_time_seconds", "Unix time the process started", lambda: server.started)
