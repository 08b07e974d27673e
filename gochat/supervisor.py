"""``gochat serve --workers N``: N worker processes on one port, one chat service through the broker.

Each worker is a whole ``gochat serve`` process (one core, one event loop) whose listening
socket sets SO_REUSEPORT, so the kernel spreads new connections over the workers. The
supervisor reserves the port (bound, never listening, so it receives no connections),
starts the workers, restarts one that dies, serves the admin port for the whole group
(readiness and metrics merged with a ``worker`` label, PITFALLS' per-worker scraping),
passes SIGHUP on (each worker reloads its own TLS certificate), and on SIGTERM drains every
worker and exits when they have.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Iterator

import gevent
from gevent import subprocess
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gochat import status_page
from gochat.config import Config
from gochat.gosync import Recv, background, select, with_cancel

log = logging.getLogger("gochat.supervisor")

WORKER_START_TIMEOUT = 20.0  # seconds for a worker's admin port to answer
RESTART_BACKOFF = (0.5, 10.0)  # seconds before restarting a dead worker: first, at most
SCRAPE_TIMEOUT = 2.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
REUSE_PORT_ENV = "GOCHAT_REUSE_PORT"  # tells a worker to share its port (set only by the supervisor)


def _fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


class Worker:
    """One worker process; its greenlet restarts it until the supervisor stops."""

    def __init__(self, index: int, argv: list[str], env: dict[str, str], admin_port: int) -> None:
        self.index, self.argv, self.env, self.admin_port = index, argv, env, admin_port
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def spawn(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, preexec_fn=_die_with_parent)
        log.info("worker %d started (pid %d, admin port %d)", self.index, self.proc.pid, self.admin_port)

    def wait_ready(self) -> bool:
        """Poll the worker's /health: a fresh process has no other way to say it is serving."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            if _fetch(self.url("/health"))[0] == 200:
                log.info("worker %d ready (pid %d)", self.index, self.proc.pid)
                return True
            gevent.sleep(0.05)
        return False


class Supervisor:
    def __init__(self, config: Config, argv: list[str]) -> None:
        self.config = config
        self.argv = argv  # the worker command line, minus --workers
        self.ctx, self.stop = with_cancel(background())  # cancelled by the first signal
        self._signals = 0
        self.reservation = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
        self.reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.reservation.bind((config.host, config.port))
        self.port = self.reservation.getsockname()[1]
        # Workers' own admin ports are internal (127.0.0.1, free ports): the supervisor's admin
        # port serves the whole group.
        self.workers = [Worker(i, self._worker_argv(i), self._worker_env(), _free_port())
                        for i in range(config.workers)]
        self.admin = None

    def _worker_argv(self, index: int) -> list[str]:
        return [sys.executable, "-m", "gochat", "serve", *self.argv, "--workers", "1", "--port", str(self.port),
                "--admin-host", "127.0.0.1"]

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[REUSE_PORT_ENV] = "1"
        env.pop("GOCHAT_WORKERS", None)
        return env

    def run(self) -> int:
        for worker in self.workers:
            worker.argv = worker.argv + ["--admin-port", str(worker.admin_port)]
            worker.spawn()
        for worker in self.workers:
            if not worker.wait_ready():
                log.error("worker %d did not start", worker.index)
                self._kill_all()
                return 1
        if self.config.admin_port:
            from gochat.admin import AdminHTTP

            self.admin = AdminHTTP(self.config.admin_host, self.config.admin_port, self._admin_app)
            self.admin.start()
        admin = f"{self.config.admin_host}:{self.admin.address[1]}" if self.admin else "off"
        log.info("gochat listening on %s:%d (admin %s, broker %s, workers %d)", self.config.host, self.port, admin,
                 self.config.shown("broker"), len(self.workers))
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self._on_signal)
        gevent.signal_handler(signal.SIGHUP, self._on_sighup)
        watchers = [gevent.spawn(self._watch, worker) for worker in self.workers]
        gevent.joinall(watchers)
        if self.admin:
            self.admin.stop(timeout=1)
        log.info("all workers stopped; exiting")
        return 0

    def _watch(self, worker: Worker) -> None:
        """Wait for the worker to exit; restart it unless we are stopping (Go: a supervisor loop)."""
        delay = RESTART_BACKOFF[0]
        while True:
            code = worker.proc.wait()
            if self.ctx.err():
                return
            log.warning("worker %d exited with %s; restarting in %.1f s", worker.index, code, delay)
            # select { case <-ctx.Done(): return; case <-time.After(delay): }
            if select(Recv(self.ctx.done()), timeout=delay).index is not None:
                return
            worker.restarts += 1
            worker.spawn()
            delay = min(delay * 2, RESTART_BACKOFF[1]) if not worker.wait_ready() else RESTART_BACKOFF[0]

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals > 1:
            self._kill_all()
            os._exit(1)
        self.stop()
        for worker in self.workers:
            if worker.proc and worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)  # each worker drains its own clients

    def _on_sighup(self) -> None:
        for worker in self.workers:
            if worker.proc and worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGHUP)

    def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.proc and worker.proc.poll() is None:
                worker.proc.kill()

    # ------------------------------------------------------------ the group's admin port

    def _admin_app(self, environ: dict, start_response) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/", "/status"):
            return status_page.app(environ, start_response)
        if path == "/health":
            return _respond(start_response, "200 OK", b'{"ok": true}')
        if path == "/ready":
            if self.ctx.err():
                return _respond(start_response, "503 Service Unavailable", b'{"ready": false, "reason": "draining"}')
            for worker in self.workers:
                status, body = _fetch(worker.url("/ready"))
                if status != 200:
                    return _respond(start_response, "503 Service Unavailable",
                                    body or b'{"ready": false, "reason": "worker"}')
            return _respond(start_response, "200 OK", b'{"ready": true}')
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            registry = CollectorRegistry(auto_describe=False)
            registry.register(_MergedMetrics(self.workers))
            return _respond(start_response, "200 OK", generate_latest(registry), CONTENT_TYPE_LATEST)
        if path == "/stats":
            import json

            per_worker = [json.loads(_fetch(w.url("/stats"))[1] or b"{}") for w in self.workers]
            totals = {key: sum(s.get(key, 0) for s in per_worker)
                      for key in ("connections", "sessions", "greenlets", "handler_greenlets", "parked_connections",
                                  "messages_in", "deliveries", "open_files")}
            totals.update(rooms=max((s.get("rooms") or 0 for s in per_worker), default=0),
                          uptime_s=max((s.get("uptime_s", 0) for s in per_worker), default=0), workers=per_worker)
            return _respond(start_response, "200 OK", json.dumps(totals).encode())
        return _respond(start_response, "404 Not Found", b'{"error": "not found"}')


class _MergedMetrics:
    """Every worker's metrics with a ``worker`` label added."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for worker in self.workers:
            status, body = _fetch(worker.url("/metrics"))
            if status != 200:
                continue
            for family in text_string_to_metric_families(body.decode()):
                target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    target.add_sample(sample.name, {**sample.labels, "worker": str(worker.index)}, sample.value)
        yield from merged.values()


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM it if the supervisor dies, even by SIGKILL (Linux)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _respond(start_response, status: str, body: bytes, content_type: str = "application/json") -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
