"""The admin HTTP server (PROTOCOL.md section 8): health, readiness, metrics, stats.

It runs on gevent's WSGI server in the same process and stays up during the drain, so
load balancers see /ready turn 503 while clients are being told to leave.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Callable, Iterable

from gevent.pywsgi import WSGIServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gochat import metrics

if TYPE_CHECKING:
    from gochat.server import Server

log = logging.getLogger("gochat.admin")

StartResponse = Callable[[str, list[tuple[str, str]]], object]


class AdminServer:
    def __init__(self, server: "Server") -> None:
        self.server = server
        config = server.config
        self.http = WSGIServer((config.admin_host, config.admin_port), self.app, log=None, error_log=log)

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
